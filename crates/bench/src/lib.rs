//! Benchmark workloads over a clustermem region.
//!
//! Every workload first fills its region with known data under the same local-memory limit,
//! so that the measured phase really reads from the hosts; the figures cover the measured
//! phase only (`setup_s` reports the fill). Every workload then verifies its result against
//! a computation that never touches the region (checksums kept outside it, a sortedness and
//! permutation check, a list walk or graph search recomputed from the seed), and the report
//! says whether it matched.

mod graph;
mod list;
mod lru;
mod progress;
mod rng;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use clustermem_mmap::AnonMapping;
use clustermem_runtime::{
    DirtyTracking, Histogram, PolicyKind, PrefetchMode, Redundancy, Region, Runtime, RuntimeConfig,
    RuntimeError, RuntimeStats, WritebackMode, PAGE_SIZE,
};
use progress::Progress;
use rng::{mix, Rng, Zipf};
use serde::Serialize;
use thiserror::Error;

/// u64 words in a page.
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// The workloads `clustermem bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Read every word of the region in order.
    SeqRead,
    /// Overwrite every word of the region in order.
    SeqWrite,
    /// Read-modify-write one word of a uniformly random page per operation.
    Random,
    /// As `Random`, with pages drawn from a Zipf(0.99) distribution.
    Zipf,
    /// Sort the region's u64 values in place (as in the Fastswap suite).
    Quicksort,
    /// Change `--lines-per-page` random 64-byte lines of a random page per operation.
    SparseWrite,
    /// Read-modify-write one word of every `--stride`-th page, wrapping to the next offset.
    Stride,
    /// Walk a linked list of 64-byte nodes scattered over the region (pointer chasing).
    ListWalk,
    /// Breadth-first search over an RMAT graph stored in the region in CSR form.
    Bfs,
}

impl Workload {
    /// Every workload, for `--help` and errors.
    pub const ALL: [(&'static str, Workload); 9] = [
        ("seq-read", Self::SeqRead),
        ("seq-write", Self::SeqWrite),
        ("random", Self::Random),
        ("zipf", Self::Zipf),
        ("quicksort", Self::Quicksort),
        ("sparse-write", Self::SparseWrite),
        ("stride", Self::Stride),
        ("list-walk", Self::ListWalk),
        ("bfs", Self::Bfs),
    ];

    /// The workload's name on the command line.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, w)| *w == self).map(|(n, _)| *n).expect("listed")
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, w)| *w).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|(n, _)| *n).collect();
            format!("unknown workload {s:?} (expected one of: {})", names.join(", "))
        })
    }
}

/// How to run a benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What to run.
    pub workload: Workload,
    /// Region size in bytes.
    pub size_bytes: u64,
    /// Local-memory limit in bytes.
    pub local_mem_bytes: u64,
    /// Memory hosts; empty for the embedded host.
    pub hosts: Vec<String>,
    /// Operations in the measured phase (`None`: the workload's default).
    pub ops: Option<u64>,
    /// Threads running the measured phase.
    pub threads: usize,
    /// Busy-poll while faults are outstanding.
    pub low_latency: bool,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Seed for data and access streams.
    pub seed: u64,
    /// Draw a progress bar on stderr for long phases.
    pub progress: bool,
    /// Where the memory comes from.
    pub backend: Backend,
    /// sparse-write: lines changed per page per operation (1..=64).
    pub lines_per_page: u32,
    /// How dirty pages are written back.
    pub writeback: WritebackMode,
    /// How written pages are found.
    pub dirty_tracking: DirtyTracking,
    /// Send the whole page when more lines than this changed.
    pub line_threshold: u32,
    /// Periodic write-back interval (None: only on eviction).
    pub flush_interval: Option<std::time::Duration>,
    /// Prefetching.
    pub prefetch: PrefetchMode,
    /// stride: pages between two touched pages.
    pub stride_pages: u64,
    /// Pointer prefetches later than this are abandoned.
    pub prefetch_deadline: std::time::Duration,
    /// Copies or erasure shards of the region on distinct hosts.
    pub redundancy: Redundancy,
}

/// Where a benchmark's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// A clustermem region under the local-memory limit.
    #[default]
    Clustermem,
    /// Plain anonymous memory, no clustermem: the baseline, e.g. under Linux swap with a
    /// memory cgroup limit (`--local-mem` is then ignored).
    Local,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "clustermem" => Ok(Self::Clustermem),
            "local" => Ok(Self::Local),
            _ => Err(format!("unknown backend {s:?} (expected clustermem or local)")),
        }
    }
}

/// The memory a workload runs on.
enum Memory<'rt> {
    Region(Region<'rt>),
    Local(AnonMapping),
}

impl Memory<'_> {
    fn local(len: usize) -> Result<Self, BenchError> {
        AnonMapping::new(len)
            .map(Self::Local)
            .map_err(|e| BenchError::Options(format!("cannot map {len} bytes: {e}")))
    }

    fn words(&self) -> &[AtomicU64] {
        match self {
            Self::Region(r) => r.as_atomic_u64s(),
            // SAFETY: the mapping is page-aligned and lives as long as `self`; AtomicU64 has
            // the size and alignment of u64 and all access through the slice is atomic.
            Self::Local(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr().cast::<AtomicU64>(), m.len() / 8)
            },
        }
    }

    fn values_mut(&mut self) -> &mut [u64] {
        let (base, len) = match self {
            Self::Region(r) => (r.as_ptr(), r.len()),
            Self::Local(m) => (m.as_ptr(), m.len()),
        };
        // SAFETY: page-aligned memory of `len` bytes owned by `self`, exclusively borrowed
        // here; every bit pattern is a valid u64.
        unsafe { std::slice::from_raw_parts_mut(base.cast::<u64>(), len / 8) }
    }
}

/// What the measured phase of a workload needs besides its memory.
struct Ctx<'a> {
    opts: &'a BenchOptions,
    ops: u64,
    progress: &'a Progress,
    /// Called between the measured phase and verification.
    end: &'a dyn Fn(),
    /// The runtime's remote-fault counter, to time faulting operations from the application.
    remote_faults: Option<&'a AtomicU64>,
    app_faults: &'a Histogram,
}

/// Why a benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The options do not make sense.
    #[error("{0}")]
    Options(String),
}

/// What a benchmark measured. Serialised as the one JSON object of `bench --json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Workload name.
    pub workload: &'static str,
    /// Region size.
    pub size_bytes: u64,
    /// Local-memory limit.
    pub local_mem_bytes: u64,
    /// `clustermem`, or `local` for plain memory (the baseline).
    pub backend: &'static str,
    /// Hosts used (the embedded host's address when none was given).
    pub hosts: Vec<String>,
    /// Whether the hosts were the embedded one.
    pub embedded_host: bool,
    /// Threads in the measured phase.
    pub threads: usize,
    /// Low-latency (busy-polling) mode.
    pub low_latency: bool,
    /// Eviction policy.
    pub policy: String,
    /// Operations in the measured phase (pages for the sequential workloads, read-modify-writes
    /// for random, zipf and stride, elements for quicksort, nodes for list-walk, edges scanned
    /// for bfs).
    pub ops: u64,
    /// Time to fill the region before measuring.
    pub setup_s: f64,
    /// Measured phase wall time.
    pub wall_s: f64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Microseconds per operation.
    pub us_per_op: f64,
    /// All faults the handler served in the measured phase.
    pub faults: u64,
    /// Faults served from a host.
    pub remote_faults: u64,
    /// Faults on never-written pages, served locally.
    pub zero_faults: u64,
    /// Faults on pages evicted moments before, moved back from the ring of recent victims
    /// (async tracking).
    pub rescued_faults: u64,
    /// First writes to clean resident pages.
    pub write_faults: u64,
    /// Median latency of a remote fault. Seen by the application (an operation that took a
    /// fault, timed around it) for random and zipf; the handler's service time otherwise.
    pub fault_p50_us: f64,
    /// 99th percentile, as `fault_p50_us`.
    pub fault_p99_us: f64,
    /// `app` or `handler`: where `fault_p50_us` was measured.
    pub fault_latency_source: &'static str,
    /// Median time from reading a fault to installing its page, in the handler.
    pub service_p50_us: f64,
    /// 99th percentile of the service time.
    pub service_p99_us: f64,
    /// Pages fetched from hosts.
    pub pages_fetched: u64,
    /// Pages evicted.
    pub pages_evicted: u64,
    /// Dirty pages written back.
    pub pages_written_back: u64,
    /// Bytes fetched.
    pub bytes_fetched: u64,
    /// Bytes sent for write-back, frame headers included.
    pub bytes_written_back: u64,
    /// Write-back mode (`line` or `page`).
    pub writeback: &'static str,
    /// Dirty pages written back (= `pages_written_back`).
    pub dirty_pages_written: u64,
    /// Changed 64-byte lines found in them (64 per page in page mode).
    pub dirty_lines_written: u64,
    /// What a page-granular system would have sent for the same write-backs.
    pub page_granular_bytes: u64,
    /// Dirty pages written back by the periodic flusher or a flush.
    pub pages_flushed: u64,
    /// How written pages were found (`sync`: write-protect faults; `async`: `PAGEMAP_SCAN`).
    pub dirty_tracking: String,
    /// Async tracking: `PAGEMAP_SCAN` calls (flusher sweeps and eviction checks).
    pub tracking_scans: u64,
    /// Async tracking: seconds the handler spent in them and in moving victims out.
    pub tracking_s: f64,
    /// `off`, `auto` or `pointer`.
    pub prefetch: &'static str,
    /// Pages fetched ahead of a fault.
    pub prefetch_issued: u64,
    /// Prefetched pages seen in use (written, or passed over by the stream they predicted).
    pub prefetch_used: u64,
    /// Prefetched pages evicted without having been seen in use (reads of a prefetched page
    /// are invisible to a userspace pager unless the stream passes it).
    pub prefetch_wasted: u64,
    /// Of `prefetch_issued`, pages a fetched page pointed to (`--prefetch pointer`).
    pub pointer_prefetch_issued: u64,
    /// Pointer chains handed to a memory host to follow near the data (`--prefetch pointer`).
    pub pointer_chains_offloaded: u64,
    /// Faults on a page whose prefetch was still in flight: the thread waited, but for a
    /// fetch already under way (not counted in `remote_faults`).
    pub prefetch_waits: u64,
    /// Pointer prefetches dropped for missing their deadline.
    pub prefetch_abandoned: u64,
    /// `none`, `replicate:N` or `erasure:K+M`.
    pub redundancy: String,
    /// Memory hosts found dead during the measured phase.
    pub hosts_lost: u64,
    /// Dropped connections re-established (requests replayed) during the measured phase.
    pub reconnects: u64,
    /// Pages whose lost copy or shard was rebuilt on another host.
    pub pages_rebuilt: u64,
    /// Bytes written to hosts by rebuilds.
    pub bytes_rebuilt: u64,
    /// Erasure-coded pages read through parity (a data shard's host was lost).
    pub degraded_reads: u64,
    /// Spans still short of a copy or shard at the end (no host to rebuild onto: every live
    /// one already holds part of them, or is full).
    pub spans_awaiting_rebuild: u64,
    /// From the first host loss to every lost shard rebuilt (the benchmark waits for it
    /// after its measured phase, up to 10 minutes); None without a loss, or while a lost shard
    /// has no host to go to (see `spans_awaiting_rebuild`).
    pub rebuild_s: Option<f64>,
    /// Fraction of operations served without a remote fault (random and zipf).
    pub hit_rate: Option<f64>,
    /// Hit rate of an exact LRU cache of the same size on the same access trace (zipf).
    pub lru_hit_rate: Option<f64>,
    /// The result matched the independent computation.
    pub verified: bool,
    /// What did not match, when `verified` is false.
    pub verify_error: Option<String>,
}

/// Runs one benchmark: start a runtime, fill, measure, verify.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    if opts.size_bytes < PAGE_SIZE as u64 || !opts.size_bytes.is_multiple_of(8) {
        return Err(BenchError::Options(format!(
            "--size must be at least one page, got {}",
            opts.size_bytes
        )));
    }
    if opts.threads == 0 {
        return Err(BenchError::Options("--threads must be at least 1".into()));
    }
    if opts.workload == Workload::SparseWrite && !(1..=64).contains(&opts.lines_per_page) {
        return Err(BenchError::Options(format!(
            "--lines-per-page must be 1..=64, got {}",
            opts.lines_per_page
        )));
    }
    let serial = matches!(opts.workload, Workload::Quicksort | Workload::ListWalk | Workload::Bfs);
    if serial && opts.threads != 1 {
        return Err(BenchError::Options(format!(
            "{} runs on one thread; drop --threads",
            opts.workload.name()
        )));
    }
    if opts.workload == Workload::Bfs && opts.ops.is_some() {
        return Err(BenchError::Options("bfs runs one whole search; drop --ops".into()));
    }
    let size =
        usize::try_from(opts.size_bytes).map_err(|_| BenchError::Options("--size too large".into()))?;
    let pages = size / PAGE_SIZE;
    if opts.workload == Workload::Stride && !(1..pages as u64).contains(&opts.stride_pages) {
        return Err(BenchError::Options(format!(
            "--stride must be 1 to {} (the region has {pages} pages), got {}",
            pages.saturating_sub(1),
            opts.stride_pages
        )));
    }
    let graph = match opts.workload {
        Workload::Bfs => Some(
            graph::Rmat::for_words(size / 8, opts.seed)
                .ok_or_else(|| BenchError::Options("--size is too small for a graph".into()))?,
        ),
        _ => None,
    };
    let runtime = match opts.backend {
        Backend::Clustermem => Some(Runtime::start(RuntimeConfig {
            hosts: opts.hosts.clone(),
            local_mem_bytes: opts.local_mem_bytes,
            low_latency: opts.low_latency,
            policy: opts.policy,
            writeback: opts.writeback,
            dirty_tracking: opts.dirty_tracking,
            line_threshold: opts.line_threshold,
            flush_interval: opts.flush_interval,
            prefetch: opts.prefetch,
            prefetch_deadline: opts.prefetch_deadline,
            redundancy: opts.redundancy,
            ..RuntimeConfig::default()
        })?),
        Backend::Local => None,
    };
    let mut memory = match &runtime {
        Some(rt) => Memory::Region(rt.map(size)?),
        None => Memory::local(size)?,
    };
    let words = memory.words().len();
    let progress = Progress::new(opts.progress);
    let list = (opts.workload == Workload::ListWalk)
        .then(|| list::List::new(memory.words().as_ptr() as u64, words, opts.seed));

    let t = Instant::now();
    match (&list, &graph) {
        (Some(list), _) => list.fill(memory.words(), opts.seed, opts.threads, &progress),
        (_, Some(graph)) => graph.fill(memory.words(), &progress),
        _ => fill(memory.words(), opts.seed, opts.threads, &progress),
    }
    // The fill's writes reach the hosts before the measured phase, so it starts from clean
    // pages and its write-back figures are its own.
    if let Memory::Region(region) = &memory {
        region.flush()?;
    }
    let setup_s = t.elapsed().as_secs_f64();
    let no_stats = RuntimeStats::default();
    let stats = runtime.as_ref().map_or(&no_stats, Runtime::stats);
    stats.reset();
    let app_faults = Histogram::default();

    let default_ops = match opts.workload {
        Workload::SeqRead | Workload::SeqWrite | Workload::Stride => pages as u64,
        Workload::Random | Workload::Zipf | Workload::SparseWrite | Workload::ListWalk => {
            (pages as u64 * 2).clamp(10_000, 2_000_000)
        }
        Workload::Quicksort => words as u64,
        // Replaced by the edges the search scanned.
        Workload::Bfs => 0,
    };
    let mut ops = opts.ops.unwrap_or(default_ops);
    if let Some(list) = &list {
        ops = ops.min(list.nodes());
    }
    let mut trace = Vec::new();
    // Workloads call `end` between their measured phase and their verification.
    let measured = std::cell::OnceCell::new();
    let end = || {
        let _ = measured.set((Instant::now(), stats.snapshot()));
        progress.finish();
    };
    let ctx = Ctx {
        opts,
        ops,
        progress: &progress,
        end: &end,
        remote_faults: runtime.as_ref().map(|rt| &rt.stats().remote_faults),
        app_faults: &app_faults,
    };
    // Notes when a host is first lost and when the rebuild after it ends.
    let watch_stop = std::sync::atomic::AtomicBool::new(false);
    let rebuild = std::sync::Mutex::new((None::<Instant>, None::<Instant>));
    let watch = |stats: &RuntimeStats| {
        use std::sync::atomic::Ordering::Relaxed;
        while !watch_stop.load(Relaxed) {
            let mut r = rebuild.lock().unwrap_or_else(|e| e.into_inner());
            if r.0.is_none() && stats.hosts_lost.load(Relaxed) > 0 {
                r.0 = Some(Instant::now());
            }
            if r.0.is_some() && stats.spans_rebuilding.load(Relaxed) == 0 && r.1.is_none() {
                // Rebuilding may not have been queued yet: require a second look.
                drop(r);
                std::thread::sleep(std::time::Duration::from_millis(20));
                if stats.spans_rebuilding.load(Relaxed) == 0 {
                    rebuild.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(Instant::now());
                }
                continue;
            }
            drop(r);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let t = Instant::now();
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| watch(stats));
        let outcome = match opts.workload {
            Workload::SeqRead => seq_read(memory.words(), &ctx),
            Workload::SeqWrite => seq_write(memory.words(), &ctx),
            Workload::Random | Workload::Zipf => rmw(memory.words(), &ctx, &mut trace),
            Workload::Quicksort => quicksort(memory.values_mut(), &ctx),
            Workload::SparseWrite => sparse_write(memory.words(), &ctx),
            Workload::Stride => stride(memory.words(), &ctx),
            Workload::ListWalk => list::list_walk(memory.words(), &ctx),
            Workload::Bfs => graph::run(memory.words(), &ctx).map(|scanned| ops = scanned),
        };
        end();
        if rebuild.lock().unwrap_or_else(|e| e.into_inner()).0.is_some() {
            let deadline = Instant::now() + std::time::Duration::from_secs(600);
            // A rebuild with no host to go to would wait for one forever: the region works
            // on, degraded, and the report says so.
            let stalled = || stats.rebuild_waiting_for_host.load(std::sync::atomic::Ordering::Relaxed) != 0;
            while rebuild.lock().unwrap_or_else(|e| e.into_inner()).1.is_none()
                && Instant::now() < deadline
                && !stalled()
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        watch_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        outcome
    });
    let (lost_at, rebuilt_at) = *rebuild.lock().unwrap_or_else(|e| e.into_inner());
    let rebuild_s = lost_at.zip(rebuilt_at).map(|(a, b)| (b - a).as_secs_f64());
    let after = stats.snapshot();
    let (t_end, snap) = *measured.get().expect("set by end()");
    let wall_s = (t_end - t).as_secs_f64();
    let verify_error = outcome.err();

    let remote_faults = snap.remote_faults;
    let (hit_rate, lru_hit_rate) = match opts.workload {
        Workload::Random | Workload::Zipf if ops > 0 => {
            let hit = 1.0 - remote_faults as f64 / ops as f64;
            let capacity = usize::try_from(opts.local_mem_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX);
            let lru = (opts.workload == Workload::Zipf).then(|| lru::hit_rate(&trace, pages, capacity));
            (Some(hit), lru)
        }
        _ => (None, None),
    };
    let app_measured = app_faults.count() > 0;
    let (fault_p50_us, fault_p99_us) = if app_measured {
        (app_faults.quantile_us(0.5), app_faults.quantile_us(0.99))
    } else {
        (snap.service_p50_us, snap.service_p99_us)
    };
    Ok(BenchReport {
        workload: opts.workload.name(),
        size_bytes: opts.size_bytes,
        local_mem_bytes: opts.local_mem_bytes,
        backend: match opts.backend {
            Backend::Clustermem => "clustermem",
            Backend::Local => "local",
        },
        hosts: runtime.as_ref().map(|rt| rt.hosts().to_vec()).unwrap_or_default(),
        embedded_host: runtime.is_some() && opts.hosts.is_empty(),
        threads: opts.threads,
        low_latency: opts.low_latency,
        policy: format!("{:?}", opts.policy).to_lowercase(),
        ops,
        setup_s,
        wall_s,
        ops_per_s: ops as f64 / wall_s,
        us_per_op: wall_s * 1e6 / ops.max(1) as f64,
        faults: snap.faults(),
        remote_faults,
        zero_faults: snap.zero_faults,
        rescued_faults: snap.rescued_faults,
        write_faults: snap.write_faults,
        fault_p50_us,
        fault_p99_us,
        fault_latency_source: if app_measured { "app" } else { "handler" },
        service_p50_us: snap.service_p50_us,
        service_p99_us: snap.service_p99_us,
        pages_fetched: snap.pages_fetched,
        pages_evicted: snap.pages_evicted,
        pages_written_back: snap.pages_written_back,
        bytes_fetched: snap.bytes_fetched,
        bytes_written_back: snap.bytes_written_back,
        writeback: match opts.writeback {
            WritebackMode::Line => "line",
            WritebackMode::Page => "page",
        },
        dirty_pages_written: snap.pages_written_back,
        dirty_lines_written: snap.dirty_lines_written,
        page_granular_bytes: snap.page_granular_bytes,
        pages_flushed: snap.pages_flushed,
        dirty_tracking: opts.dirty_tracking.to_string(),
        tracking_scans: snap.tracking_scans,
        tracking_s: snap.tracking_ns as f64 / 1e9,
        prefetch: opts.prefetch.name(),
        prefetch_issued: snap.prefetch_issued,
        prefetch_used: snap.prefetch_used,
        prefetch_wasted: snap.prefetch_wasted,
        pointer_prefetch_issued: snap.pointer_prefetch_issued,
        pointer_chains_offloaded: snap.pointer_chains_offloaded,
        prefetch_waits: snap.prefetch_waits,
        prefetch_abandoned: snap.prefetch_abandoned,
        redundancy: opts.redundancy.to_string(),
        hosts_lost: after.hosts_lost,
        reconnects: after.reconnects,
        pages_rebuilt: after.pages_rebuilt,
        bytes_rebuilt: after.bytes_rebuilt,
        degraded_reads: after.degraded_reads,
        spans_awaiting_rebuild: after.spans_rebuilding,
        rebuild_s,
        hit_rate,
        lru_hit_rate,
        verified: verify_error.is_none(),
        verify_error,
    })
}

/// The value word `i` holds after the fill.
fn fill_value(seed: u64, i: usize) -> u64 {
    mix(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Splits `0..n` into `threads` contiguous chunks and runs `f(chunk)` on each, in parallel.
fn parallel_chunks(n: usize, threads: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let range = (t * per).min(n)..((t + 1) * per).min(n);
            let f = &f;
            s.spawn(move || f(range));
        }
    });
}

fn fill(words: &[AtomicU64], seed: u64, threads: usize, progress: &Progress) {
    progress.phase("fill", words.len() as u64);
    parallel_chunks(words.len(), threads, |range| {
        for i in range {
            words[i].store(fill_value(seed, i), Relaxed);
            if i % WORDS_PER_PAGE == 0 {
                progress.advance(WORDS_PER_PAGE as u64);
            }
        }
    });
}

/// Reads `ops` pages in order (wrapping), summing words; checks the sum.
fn seq_read(words: &[AtomicU64], ctx: &Ctx<'_>) -> Result<(), String> {
    let (opts, ops, progress) = (ctx.opts, ctx.ops, ctx.progress);
    let pages = words.len() / WORDS_PER_PAGE;
    progress.phase("seq-read", ops);
    let total = std::sync::atomic::AtomicU64::new(0);
    let ops = usize::try_from(ops).expect("fits");
    parallel_chunks(ops, opts.threads, |range| {
        let mut sum = 0u64;
        for op in range {
            let page = op % pages;
            for w in &words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE] {
                sum = sum.wrapping_add(w.load(Relaxed));
            }
            progress.advance(1);
        }
        total.fetch_add(sum, Relaxed);
    });
    (ctx.end)();
    let expected = (0..ops)
        .flat_map(|op| {
            let page = op % pages;
            page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE
        })
        .fold(0u64, |s, i| s.wrapping_add(fill_value(opts.seed, i)));
    let got = total.load(Relaxed);
    if got == expected {
        Ok(())
    } else {
        Err(format!("seq-read checksum {got:#x}, expected {expected:#x}"))
    }
}

/// Overwrites `ops` pages in order (wrapping) with a second pattern, then reads the region
/// back (not timed) and checks every word.
fn seq_write(words: &[AtomicU64], ctx: &Ctx<'_>) -> Result<(), String> {
    let (opts, ops, progress) = (ctx.opts, ctx.ops, ctx.progress);
    let pages = words.len() / WORDS_PER_PAGE;
    let seed2 = !opts.seed;
    progress.phase("seq-write", ops);
    let ops = usize::try_from(ops).expect("fits");
    parallel_chunks(ops, opts.threads, |range| {
        for op in range {
            let page = op % pages;
            let first = page * WORDS_PER_PAGE;
            for (i, w) in words[first..first + WORDS_PER_PAGE].iter().enumerate() {
                w.store(fill_value(seed2, first + i), Relaxed);
            }
            progress.advance(1);
        }
    });
    (ctx.end)();
    let written = ops.min(pages) * WORDS_PER_PAGE;
    for (i, w) in words.iter().enumerate() {
        let expected = if i < written { fill_value(seed2, i) } else { fill_value(opts.seed, i) };
        let got = w.load(Relaxed);
        if got != expected {
            return Err(format!("word {i} holds {got:#x}, expected {expected:#x}"));
        }
    }
    Ok(())
}

/// `ops` read-modify-writes of one word of a random (uniform or Zipf) page; each thread keeps
/// a count of increments per page outside the region, and the page sums are checked after.
fn rmw(words: &[AtomicU64], ctx: &Ctx<'_>, trace: &mut Vec<u32>) -> Result<(), String> {
    let (opts, ops, progress, app_faults) = (ctx.opts, ctx.ops, ctx.progress, ctx.app_faults);
    let pages = words.len() / WORDS_PER_PAGE;
    let zipf = (opts.workload == Workload::Zipf).then(|| Zipf::new(pages as u64, 0.99));
    progress.phase(opts.workload.name(), ops);
    let remote = ctx.remote_faults;
    let per_thread = ops.div_ceil(opts.threads as u64);
    let record_trace = opts.workload == Workload::Zipf;
    let results: Vec<(Vec<u32>, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.threads)
            .map(|t| {
                let zipf = zipf.as_ref();
                s.spawn(move || {
                    let mut rng = Rng::new(opts.seed ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                    let mut counts = vec![0u32; pages];
                    let mut trace = Vec::new();
                    let n = per_thread.min(ops.saturating_sub(per_thread * t as u64));
                    for _ in 0..n {
                        let page = match zipf {
                            Some(z) => z.sample_scattered(&mut rng),
                            None => rng.below(pages as u64),
                        } as usize;
                        let word = page * WORDS_PER_PAGE + rng.below(WORDS_PER_PAGE as u64) as usize;
                        let before = remote.map(|r| r.load(Relaxed));
                        let start = Instant::now();
                        words[word].fetch_add(1, Relaxed);
                        if remote.map(|r| r.load(Relaxed)) != before {
                            app_faults.record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        }
                        counts[page] += 1;
                        if record_trace {
                            trace.push(u32::try_from(page).expect("page indices fit u32"));
                        }
                        progress.advance(1);
                    }
                    (counts, trace)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    });
    (ctx.end)();
    let mut counts = vec![0u64; pages];
    for (c, t) in results {
        for (total, n) in counts.iter_mut().zip(c) {
            *total += u64::from(n);
        }
        trace.extend(t);
    }
    check_increments(words, opts.seed, &counts)
}

/// Checks that each page's words sum to their fill values plus the increments counted for it
/// outside the region.
fn check_increments(words: &[AtomicU64], seed: u64, counts: &[u64]) -> Result<(), String> {
    for (page, &n) in counts.iter().enumerate() {
        let range = page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE;
        let expected = range.clone().fold(n, |s, i| s.wrapping_add(fill_value(seed, i)));
        let got = words[range].iter().fold(0u64, |s, w| s.wrapping_add(w.load(Relaxed)));
        if got != expected {
            return Err(format!("page {page}: sum {got:#x}, expected {expected:#x} after {n} increments"));
        }
    }
    Ok(())
}

/// The page the `op`-th stride operation touches: pages 0, s, 2s, ... to the end of the
/// region, then 1, 1+s, 1+2s, ..., so `pages` operations touch every page once.
fn stride_page(op: u64, pages: u64, stride: u64) -> u64 {
    let k = op % pages;
    let (rows, rem) = (pages / stride, pages % stride);
    // The first `rem` offsets have one page more than the others.
    let long = rem * (rows + 1);
    let (offset, row) = if k < long {
        (k / (rows + 1), k % (rows + 1))
    } else {
        (rem + (k - long) / rows, (k - long) % rows)
    };
    offset + row * stride
}

/// `ops` read-modify-writes, one word of each `--stride`-th page (see `stride_page`); threads
/// take contiguous runs of operations and count increments per page outside the region.
fn stride(words: &[AtomicU64], ctx: &Ctx<'_>) -> Result<(), String> {
    let (opts, ops, progress) = (ctx.opts, ctx.ops, ctx.progress);
    let pages = words.len() / WORDS_PER_PAGE;
    progress.phase("stride", ops);
    let counts: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    parallel_chunks(usize::try_from(ops).expect("fits"), opts.threads, |range| {
        for op in range {
            let page = stride_page(op as u64, pages as u64, opts.stride_pages) as usize;
            let word = page * WORDS_PER_PAGE + (mix(opts.seed ^ op as u64) % WORDS_PER_PAGE as u64) as usize;
            words[word].fetch_add(1, Relaxed);
            counts[page].fetch_add(1, Relaxed);
            progress.advance(1);
        }
    });
    (ctx.end)();
    let counts: Vec<u64> = counts.into_iter().map(AtomicU64::into_inner).collect();
    check_increments(words, opts.seed, &counts)
}

/// The value word `word` of line `line` of page `page` holds after its `version`-th change.
fn line_value(seed: u64, page: usize, line: usize, word: usize, version: u8) -> u64 {
    mix(seed.rotate_left(17) ^ ((((page * 64 + line) * 8 + word) as u64) << 8) ^ u64::from(version))
}

/// `ops` operations, each changing `lines_per_page` distinct random lines (all 8 words) of a
/// random page. Threads own disjoint pages (page % threads), so the final state is
/// determined; a version byte per line, kept outside the region, says what each line holds.
fn sparse_write(words: &[AtomicU64], ctx: &Ctx<'_>) -> Result<(), String> {
    use std::sync::atomic::AtomicU8;
    let (opts, ops, progress) = (ctx.opts, ctx.ops, ctx.progress);
    let pages = words.len() / WORDS_PER_PAGE;
    let threads = opts.threads.min(pages);
    let versions: Vec<AtomicU8> = (0..pages * 64).map(|_| AtomicU8::new(0)).collect();
    progress.phase("sparse-write", ops);
    let per_thread = ops.div_ceil(threads as u64);
    std::thread::scope(|s| {
        for t in 0..threads {
            let versions = &versions;
            s.spawn(move || {
                let mut rng = Rng::new(opts.seed ^ (t as u64 + 7).wrapping_mul(0xD6E8_FEB8_6659_FD93));
                let owned = (pages - t).div_ceil(threads) as u64;
                for _ in 0..per_thread.min(ops.saturating_sub(per_thread * t as u64)) {
                    let page = rng.below(owned) as usize * threads + t;
                    let mut chosen = 0u64;
                    while chosen.count_ones() < opts.lines_per_page {
                        chosen |= 1 << rng.below(64);
                    }
                    while chosen != 0 {
                        let line = chosen.trailing_zeros() as usize;
                        chosen &= chosen - 1;
                        let v = versions[page * 64 + line].fetch_add(1, Relaxed).wrapping_add(1);
                        let first = page * WORDS_PER_PAGE + line * 8;
                        for (word, w) in words[first..first + 8].iter().enumerate() {
                            w.store(line_value(opts.seed, page, line, word, v), Relaxed);
                        }
                    }
                    progress.advance(1);
                }
            });
        }
    });
    (ctx.end)();
    for (i, w) in words.iter().enumerate() {
        let (page, line, word) = (i / WORDS_PER_PAGE, (i % WORDS_PER_PAGE) / 8, i % 8);
        let v = versions[page * 64 + line].load(Relaxed);
        let expected =
            if v == 0 { fill_value(opts.seed, i) } else { line_value(opts.seed, page, line, word, v) };
        let got = w.load(Relaxed);
        if got != expected {
            return Err(format!("page {page} line {line} word {word}: {got:#x}, expected {expected:#x}"));
        }
    }
    Ok(())
}

/// Sorts the region's words in place, then checks order and that the multiset is unchanged.
fn quicksort(values: &mut [u64], ctx: &Ctx<'_>) -> Result<(), String> {
    let seed = ctx.opts.seed;
    ctx.progress.phase("quicksort", 1);
    values.sort_unstable();
    ctx.progress.advance(1);
    (ctx.end)();
    for i in 1..values.len() {
        if values[i - 1] > values[i] {
            return Err(format!("not sorted at {i}: {} > {}", values[i - 1], values[i]));
        }
    }
    // An order-independent fingerprint of the multiset, computed without the region for the
    // expected side.
    let fingerprint = |it: &mut dyn Iterator<Item = u64>| {
        it.fold((0u64, 0u64), |(a, b), v| (a.wrapping_add(mix(v)), b ^ mix(v ^ 0x5555)))
    };
    let got = fingerprint(&mut values.iter().copied());
    let expected = fingerprint(&mut (0..values.len()).map(|i| fill_value(seed, i)));
    if got == expected {
        Ok(())
    } else {
        Err("sorted values are not a permutation of the input".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_touches_every_page_once_per_sweep() {
        for (pages, stride) in [(10u64, 3u64), (12, 4), (4096, 16), (7, 6), (5, 1)] {
            let order: Vec<u64> = (0..pages).map(|op| stride_page(op, pages, stride)).collect();
            let mut seen = order.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..pages).collect::<Vec<_>>(), "pages {pages} stride {stride}");
            // Within a row the step is the stride; the sweep wraps.
            assert_eq!(order[1], stride, "{order:?}");
            assert_eq!(stride_page(pages, pages, stride), order[0]);
        }
    }

    #[test]
    fn increment_check_catches_a_lost_update() {
        let words: Vec<AtomicU64> =
            (0..2 * WORDS_PER_PAGE).map(|i| AtomicU64::new(fill_value(4, i))).collect();
        words[WORDS_PER_PAGE + 3].fetch_add(2, Relaxed);
        assert_eq!(check_increments(&words, 4, &[0, 2]), Ok(()));
        assert!(check_increments(&words, 4, &[0, 3]).is_err());
        assert!(check_increments(&words, 4, &[1, 2]).is_err());
    }
}
