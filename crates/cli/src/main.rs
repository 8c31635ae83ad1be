//! `clustermem`: pool memory across machines.
//!
//! `clustermem host` donates this machine's RAM; `clustermem bench` maps a region backed by
//! hosts (or by an embedded host, when none is given) and measures a workload on it.

mod duration;
mod run;
mod size;
mod status;

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use clustermem_bench::{Backend, BenchOptions, BenchReport, Workload};
use clustermem_host::MemoryHost;
use clustermem_runtime::{DirtyTracking, PolicyKind, PrefetchMode, Redundancy, WritebackMode};
use size::{parse_size, parse_size_or_percent};

#[derive(Parser, Debug)]
#[command(
    name = "clustermem",
    version,
    about = "Pool memory across machines: memory hosts donate RAM, compute hosts page it in over TCP",
    long_about = "Pool memory across machines.\n\n\
        Memory hosts (`clustermem host`) donate RAM. A compute host maps regions whose pages live \
        on those hosts; a touched page that is not local faults (userfaultfd), is fetched over TCP \
        and installed, and a bound on local memory evicts cold pages, writing back dirty ones.\n\n\
        Start here:\n  clustermem bench random --size 1G --local-mem 25%     (embedded host, no set-up)\n  \
        clustermem run --local-mem 256M -- python3 job.py     (an unmodified program)\n  \
        clustermem host --listen 0.0.0.0:7070 --capacity 8G    (on each memory host)\n  \
        clustermem bench zipf --hosts 10.0.0.2:7070,10.0.0.3:7070 --size 4G --local-mem 1G\n\n\
        Needs Linux >= 5.7 and permission to use userfaultfd (root, access to /dev/userfaultfd, \
        or sysctl vm.unprivileged_userfaultfd=1)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Donate this machine's memory: serve slabs to compute hosts until SIGINT/SIGTERM.
    Host(HostArgs),
    /// Map a region, run a workload on it under a local-memory limit, verify, report figures.
    /// `bench tx --pool PATH` measures failure-atomic transactions on a persistent region.
    Bench(BenchArgs),
    /// Run an unmodified program with its large memory in cluster memory, its resident set
    /// bounded by --local-mem: `clustermem run --local-mem 256M -- python3 job.py`.
    Run(run::RunArgs),
    /// Ask memory hosts whether they are up and how full they are: one row per host
    /// (`--json`: one object). Exits 1 when any host is down.
    Status(status::StatusArgs),
    /// Crash-test a subsystem: kill it at random moments and check what survives.
    Crashtest {
        #[command(subcommand)]
        target: CrashTarget,
    },
}

#[derive(Subcommand, Debug)]
enum CrashTarget {
    /// Random transactions on a persistent pool, killed with SIGKILL at random moments and at
    /// injected failpoints; after each kill the pool must hold exactly a committed prefix.
    Tx(CrashTxArgs),
}

#[derive(Args, Debug)]
struct CrashTxArgs {
    /// Pool file to use (created; an existing file is replaced only if it is a clustermem pool).
    #[arg(long)]
    pool: std::path::PathBuf,
    /// Kill-and-recover iterations.
    #[arg(long, default_value_t = 100)]
    iterations: u64,
    /// Seed for transactions and kill points.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct HostArgs {
    /// Address to listen on (use a specific interface address in production).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Memory to donate (e.g. 8G, 512M); requests beyond it are refused.
    #[arg(long, value_parser = parse_capacity)]
    capacity: u64,
    /// How long the slabs of a client whose connection ended are kept for it to reconnect and
    /// resume its session (Resume message) before they are freed; 0 frees them at once.
    /// Slabs of a client that never sent Resume are freed when its connection ends. A Resume
    /// of a session another live connection holds closes that connection and adopts its slabs.
    #[arg(long, default_value = "30s", value_parser = duration::parse_duration)]
    orphan_grace: Duration,
    /// Do not follow pointer chains for clients (`--prefetch pointer` asks a host to, so a
    /// linked list costs the client one round trip per 32 nodes instead of one per node);
    /// such clients then chase their chains themselves.
    #[arg(long)]
    no_pointer_chasing: bool,
    /// How long a connection busy-polls for its client's next request while the client is
    /// busy (its last request came within that long of the one before): a request then needs
    /// no wake-up of a sleeping thread (on a VM, of a halted CPU: ~33 us). The price is a CPU
    /// kept busy while a client is (yielded to any other thread that wants it). 0: poll 50 us
    /// after each request (200 us for a --low-latency client), then sleep. At most 100ms.
    #[arg(long, default_value = "1ms", value_parser = parse_busy_poll)]
    busy_poll: Duration,
    /// For a parent that started this host (bench's embedded host): print the address
    /// listened on as the first line of stdout instead of the banner on stderr.
    #[arg(long, hide = true)]
    announce: bool,
}

/// What `bench` runs: a region workload, or transactions on a persistent pool.
#[derive(Debug, Clone, Copy)]
enum BenchTarget {
    Region(Workload),
    Tx,
}

fn parse_bench_target(s: &str) -> Result<BenchTarget, String> {
    if s == "tx" {
        return Ok(BenchTarget::Tx);
    }
    s.parse::<Workload>().map(BenchTarget::Region).map_err(|e| format!("{e}, or tx"))
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// seq-read | seq-write | random (uniform read-modify-write) | zipf (skewed) | quicksort |
    /// sparse-write (K random lines per page) | stride (every --stride-th page, wrapping) |
    /// list-walk (pointer chasing through a list scattered over the region) | bfs (search of an
    /// RMAT graph stored in CSR form) | tx (failure-atomic transactions on --pool)
    #[arg(value_parser = parse_bench_target)]
    workload: BenchTarget,
    /// Region size (e.g. 512M, 2G, 1GiB, or bytes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Local-memory limit: a size, or a percentage of --size (e.g. 25%).
    #[arg(long, default_value = "25%")]
    local_mem: String,
    /// Memory hosts, comma-separated host:port. None: an embedded host on loopback.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Operations in the measured phase (default: one pass for seq-* and stride, 2x pages for
    /// random, zipf and list-walk nodes; bfs always runs one whole search).
    #[arg(long)]
    ops: Option<u64>,
    /// Threads in the measured phase (and the fill).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Busy-poll while faults are outstanding and for 100 us after (never when idle; the
    /// default mode polls too, but only for a fault's reply, up to 50 us). While one thread
    /// faults, the handler runs on that thread's CPU in both modes and does not poll idle
    /// there: then the two are about as fast (on a 2-core VM 19-30 us per random operation
    /// either way); the hosts still poll for requests, so the flag still keeps a core busy.
    #[arg(long)]
    low_latency: bool,
    /// Eviction policy: s3fifo (keeps hot pages; default) or fifo.
    #[arg(long, default_value = "s3fifo", value_parser = |s: &str| s.parse::<PolicyKind>())]
    policy: PolicyKind,
    /// Seed for data and access streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print exactly one JSON object on stdout instead of a summary.
    #[arg(long)]
    json: bool,
    /// clustermem, or local: plain memory without clustermem, the baseline to run under Linux
    /// swap with a memory cgroup limit (see bench/swap/run.sh); ignores --local-mem and --hosts.
    #[arg(long, default_value = "clustermem", value_parser = |s: &str| s.parse::<Backend>())]
    backend: Backend,
    /// stride: pages between two touched pages.
    #[arg(long, default_value_t = 16)]
    stride: u64,
    /// sparse-write: 64-byte lines changed per page per operation.
    #[arg(long, default_value_t = 2)]
    lines_per_page: u32,
    /// Write back only the 64-byte lines that changed (line, default with sync tracking) or
    /// whole pages (page, default and only choice with async tracking). Line mode keeps a
    /// clean twin of each dirty page (counted against --local-mem) and diffs it at write-back
    /// (~0.3 us a page); the periodic flusher keeps twins few.
    #[arg(long, value_parser = |s: &str| s.parse::<WritebackMode>())]
    writeback: Option<WritebackMode>,
    /// How written pages are found. sync (default): pages are installed write-protected and
    /// the first store to each waits for a fault round trip through the handler (~17 us on a
    /// 2-core VM), which takes the twin line write-back needs. async (Linux 6.8+): the kernel
    /// lets the first store in by itself (UFFD_FEATURE_WP_ASYNC, ~1 us) and the flusher and
    /// eviction find written pages with PAGEMAP_SCAN (~1 ms per GiB swept); no twins, so
    /// whole-page write-back, and evicted pages are moved out (UFFDIO_MOVE) so no racing
    /// store is lost. Async is faster for dense writers (sorts, sequential writes); sync
    /// sends 20-40x fewer bytes for sparse ones (see bench/writeback.sh).
    #[arg(long, default_value = "sync", value_parser = |s: &str| s.parse::<DirtyTracking>())]
    dirty_tracking: DirtyTracking,
    /// Line mode: send the whole page when more than this many of its 64 lines changed.
    #[arg(long, default_value_t = 48)]
    line_threshold: u32,
    /// Prefetch: auto (follow sequential and strided miss streams; random streams get nothing),
    /// pointer (auto, plus: when a page arrives for a fault, the 8-byte values in the faulting
    /// 64-byte line that are addresses inside the region have their pages fetched too, and
    /// the chain is followed from each arrival, up to 16 hops ahead of the program; for
    /// linked lists, trees, graphs of pointers), or off.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<PrefetchMode>())]
    prefetch: PrefetchMode,
    /// pointer: a pointer prefetch not back within this many microseconds is dropped (its
    /// page faults normally when touched) unless a thread already waits for it.
    #[arg(long, default_value_t = 5000)]
    prefetch_deadline_us: u64,
    /// Survive the loss of memory hosts: none; replicate:N (every slab on N distinct hosts,
    /// written to all, read from any live copy); or erasure:K+M (pages whole on K data hosts,
    /// Reed-Solomon parity of each stripe of K pages on M more, any K of which rebuild it; K a
    /// power of two from 2 to 64; host memory (K+M)/K times the region; needs sync dirty
    /// tracking). A lost host's share is rebuilt onto the others in
    /// the background; with more hosts lost than the setting covers, the pages they held read
    /// as an error.
    #[arg(long, default_value = "none", value_parser = |s: &str| s.parse::<Redundancy>())]
    redundancy: Redundancy,
    /// Write dirty pages back at least this often, in milliseconds (0: only on eviction).
    #[arg(long, default_value_t = 100)]
    flush_interval_ms: u64,
    /// tx: the pool file (created if absent).
    #[arg(long)]
    pool: Option<std::path::PathBuf>,
    /// tx: 64-byte-aligned u64 updates per transaction.
    #[arg(long, default_value_t = 1)]
    updates_per_tx: usize,
    /// tx: how long to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// tx: commit asynchronously (durable later, in groups) instead of waiting for each.
    #[arg(long)]
    async_commit: bool,
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Release);
}

extern "C" fn on_sigbus(_: libc::c_int) {
    let msg = b"clustermem: a region page was lost (its memory host failed; see above); exiting\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is a static buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(3);
    }
}

fn install_handler(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installs a handler that only touches an atomic or calls async-signal-safe
    // functions.
    unsafe { libc::signal(signal, handler as libc::sighandler_t) };
}

fn parse_capacity(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("a host of capacity 0 could serve nothing (e.g. --capacity 8G)".to_string()),
        n => Ok(n),
    }
}

fn parse_busy_poll(s: &str) -> Result<Duration, String> {
    let window = duration::parse_duration(s)?;
    if window > clustermem_host::MAX_BUSY_POLL {
        return Err(format!(
            "at most {:?}: a polling connection looks at shutdown only between polls (e.g. --busy-poll 1ms)",
            clustermem_host::MAX_BUSY_POLL
        ));
    }
    Ok(window)
}

fn run_host(args: &HostArgs) -> Result<()> {
    let mut host = MemoryHost::bind(args.listen.as_str(), args.capacity)?
        .with_orphan_grace(args.orphan_grace)
        .with_busy_poll(args.busy_poll);
    if args.no_pointer_chasing {
        host = host.without_pointer_chasing();
    }
    let flag = host.shutdown_flag();
    install_handler(libc::SIGINT, on_terminate);
    install_handler(libc::SIGTERM, on_terminate);
    std::thread::spawn(move || {
        while !SIGNALLED.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
        flag.store(true, Ordering::Release);
    });
    if args.announce {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", host.local_addr()).and_then(|()| out.flush())?;
        return Ok(host.serve()?);
    }
    eprintln!(
        "clustermem host: serving {} on {} (SIGINT/SIGTERM to stop)",
        human_bytes(args.capacity),
        host.local_addr()
    );
    if let Some(memory) = clustermem_host::machine_memory().filter(|&m| args.capacity > m) {
        eprintln!(
            "clustermem host: WARNING: --capacity {} is more than this machine's RAM and swap ({}): \
             clients that fill it will get this host killed by the kernel's OOM killer, and lose \
             what it holds",
            human_bytes(args.capacity),
            human_bytes(memory)
        );
    }
    host.serve()?;
    eprintln!("clustermem host: stopped");
    Ok(())
}

/// The embedded memory host of `bench`: this binary's `host` command in a child process on
/// loopback, so that, like a real remote host, it shares no address space with the runtime
/// (in-process, every eviction's TLB shootdown interrupted it too: ~5 us more per fault in
/// low-latency mode). Stopped when dropped; killed by the kernel if we die first.
struct ChildHost {
    child: std::process::Child,
    addr: String,
}

impl ChildHost {
    fn start(capacity: u64) -> Result<Self> {
        // This very binary, even if its file was replaced since it started.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.args(["host", "--listen", "127.0.0.1:0", "--announce"])
            .arg("--capacity")
            .arg(capacity.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let parent = std::process::id();
        // SAFETY: the closure only calls prctl and getppid (async-signal-safe) and builds an
        // io::Error from a raw errno, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                // Killed when the thread that spawned it (main, here) exits; if the parent
                // died before this point, the signal would never come: give up instead.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the embedded memory host")?;
        // From here on, dropping `host` stops the child, on every error path too.
        let mut host = Self { child, addr: String::new() };
        let stdout = host.child.stdout.take().expect("piped");
        // The host writes nothing else to stdout (its messages go to stderr), so the pipe
        // may close after this line.
        std::io::BufReader::new(stdout)
            .read_line(&mut host.addr)
            .context("reading the embedded host's address")?;
        host.addr = host.addr.trim().to_string();
        if host.addr.is_empty() {
            bail!("the embedded memory host exited before listening (see its message above)");
        }
        Ok(host)
    }
}

impl Drop for ChildHost {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped until a wait below.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let asked = std::time::Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if asked.elapsed() > Duration::from_secs(3) {
                // Stuck (e.g. a send to a client that stopped reading): no more waiting.
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.wait();
    }
}

fn run_bench(args: &BenchArgs) -> Result<bool> {
    let workload = match args.workload {
        BenchTarget::Region(w) => w,
        BenchTarget::Tx => return run_bench_tx(args),
    };
    let local_mem = parse_size_or_percent(&args.local_mem, args.size).map_err(anyhow::Error::msg)?;
    if local_mem < 4096 {
        bail!("--local-mem {} is less than one page", args.local_mem);
    }
    if args.backend == Backend::Clustermem {
        clustermem_runtime::check_userfaultfd()?;
        install_handler(libc::SIGBUS, on_sigbus);
    }
    let embedded = if args.backend == Backend::Clustermem && args.hosts.is_empty() {
        Some(ChildHost::start(clustermem_runtime::default_embedded_capacity())?)
    } else {
        None
    };
    let opts = BenchOptions {
        workload,
        size_bytes: args.size,
        local_mem_bytes: local_mem,
        hosts: embedded.as_ref().map_or_else(|| args.hosts.clone(), |h| vec![h.addr.clone()]),
        ops: args.ops,
        threads: args.threads,
        low_latency: args.low_latency,
        policy: args.policy,
        seed: args.seed,
        progress: !args.json,
        backend: args.backend,
        lines_per_page: args.lines_per_page,
        writeback: args.writeback.unwrap_or(match args.dirty_tracking {
            DirtyTracking::Sync => WritebackMode::Line,
            DirtyTracking::Async => WritebackMode::Page,
        }),
        dirty_tracking: args.dirty_tracking,
        line_threshold: args.line_threshold,
        flush_interval: (args.flush_interval_ms > 0).then(|| Duration::from_millis(args.flush_interval_ms)),
        prefetch: args.prefetch,
        stride_pages: args.stride,
        prefetch_deadline: Duration::from_micros(args.prefetch_deadline_us),
        redundancy: args.redundancy,
    };
    let mut report = clustermem_bench::run(&opts).context("benchmark failed")?;
    report.embedded_host = embedded.is_some();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    if let Some(e) = &report.verify_error {
        eprintln!("clustermem bench: VERIFICATION FAILED: {e}");
    }
    Ok(report.verified)
}

fn run_bench_tx(args: &BenchArgs) -> Result<bool> {
    let Some(pool) = &args.pool else { bail!("bench tx needs --pool PATH (a pool file to create or reuse)") };
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--seconds must be positive");
    }
    let mut opts = clustermem_pmem::TxBenchOptions::new(pool.clone());
    opts.updates_per_tx = args.updates_per_tx;
    opts.threads = args.threads;
    opts.duration = Duration::from_secs_f64(args.seconds);
    opts.async_commit = args.async_commit;
    opts.seed = args.seed;
    let r = clustermem_pmem::bench_tx(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "tx on {}: {} thread(s), {} update(s)/tx{}",
            pool.display(),
            r.threads,
            r.updates_per_tx,
            if r.async_commit { ", async commit" } else { "" }
        );
        println!(
            "  {:.0} tx/s ({} tx in {:.2} s), {:.1} tx per fdatasync",
            r.tx_per_s, r.txs, r.wall_s, r.tx_per_fdatasync
        );
        println!(
            "  {:.1} bytes logged per tx for {:.1} bytes changed",
            r.bytes_logged_per_tx, r.bytes_changed_per_tx
        );
    }
    Ok(true)
}

fn run_crashtest_tx(args: &CrashTxArgs) -> Result<bool> {
    let mut opts = clustermem_pmem::CrashTestOptions::new(args.pool.clone());
    opts.iterations = args.iterations;
    opts.seed = args.seed;
    let r = clustermem_pmem::crashtest(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "crashtest tx: {} iterations ({} random kills, {} at failpoints), {} committed transactions checked",
            r.iterations, r.kills, r.failpoint_kills, r.committed_tx_checked
        );
        println!("  violations: {}", r.violations);
        for v in &r.violation_details {
            println!("  - {v}");
        }
    }
    Ok(r.violations == 0)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn print_summary(r: &BenchReport) {
    if r.backend == "local" {
        println!(
            "{} on {} of plain local memory (no clustermem), {} thread(s)",
            r.workload,
            human_bytes(r.size_bytes),
            r.threads
        );
    } else {
        let hosts =
            if r.embedded_host { format!("embedded host {}", r.hosts.join(",")) } else { r.hosts.join(",") };
        println!(
            "{} on {} region, {} local ({hosts}), {} thread(s){}",
            r.workload,
            human_bytes(r.size_bytes),
            human_bytes(r.local_mem_bytes),
            r.threads,
            if r.low_latency { ", low-latency" } else { "" }
        );
    }
    println!("  setup (fill)   {:.2} s", r.setup_s);
    println!(
        "  measured       {} ops in {:.3} s: {:.0} ops/s, {:.2} us/op",
        r.ops, r.wall_s, r.ops_per_s, r.us_per_op
    );
    println!(
        "  faults         {} ({} remote, {} zero-fill, {} from recent victims, {} first-write)",
        r.faults, r.remote_faults, r.zero_faults, r.rescued_faults, r.write_faults
    );
    println!(
        "  fault latency  p50 {:.1} us, p99 {:.1} us (seen by the {}); handler service p50 {:.1} us",
        r.fault_p50_us,
        r.fault_p99_us,
        if r.fault_latency_source == "app" { "application" } else { "handler" },
        r.service_p50_us
    );
    println!(
        "  traffic        {} pages fetched ({}), {} evicted, {} written back ({})",
        r.pages_fetched,
        human_bytes(r.bytes_fetched),
        r.pages_evicted,
        r.pages_written_back,
        human_bytes(r.bytes_written_back)
    );
    if r.dirty_tracking == "async" {
        println!(
            "  tracking       async (PAGEMAP_SCAN): {} scans, {:.3} s in scans and moves",
            r.tracking_scans, r.tracking_s
        );
    }
    if r.dirty_pages_written > 0 {
        println!(
            "  write-back     {} mode: {} dirty pages, {} lines changed; {} sent vs {} page-granular ({:.1}x less)",
            r.writeback,
            r.dirty_pages_written,
            r.dirty_lines_written,
            human_bytes(r.bytes_written_back),
            human_bytes(r.page_granular_bytes),
            r.page_granular_bytes as f64 / r.bytes_written_back.max(1) as f64
        );
    }
    if r.prefetch_issued > 0 {
        println!(
            "  prefetch       {} pages issued ({} by pointer, {} chains followed by hosts), {} seen used, {} evicted unseen",
            r.prefetch_issued, r.pointer_prefetch_issued, r.pointer_chains_offloaded, r.prefetch_used, r.prefetch_wasted
        );
        println!(
            "                 {} faults waited for a prefetch in flight, {} abandoned past the deadline",
            r.prefetch_waits, r.prefetch_abandoned
        );
    }
    if let Some(h) = r.hit_rate {
        match r.lru_hit_rate {
            Some(lru) => println!(
                "  hit rate       {:.1}% (exact LRU on the same trace: {:.1}%)",
                h * 100.0,
                lru * 100.0
            ),
            None => println!("  hit rate       {:.1}%", h * 100.0),
        }
    }
    if r.redundancy != "none" || r.hosts_lost > 0 || r.reconnects > 0 {
        let rebuild = match (r.rebuild_s, r.spans_awaiting_rebuild) {
            (Some(s), _) => format!("rebuilt in {s:.2} s"),
            (None, 0) => "nothing to rebuild".to_string(),
            (None, n) => format!("{n} span(s) still short of a copy or shard: no host to rebuild onto"),
        };
        println!(
            "  redundancy     {}: {} host(s) lost, {} reconnection(s), {} pages rebuilt ({rebuild}), {} degraded reads",
            r.redundancy, r.hosts_lost, r.reconnects, r.pages_rebuilt, r.degraded_reads
        );
    }
    println!("  verified       {}", if r.verified { "yes" } else { "NO" });
}

fn main() -> ExitCode {
    // A crash-test child re-executes this binary; it never returns from here.
    clustermem_pmem::maybe_run_crash_child();
    let cli = Cli::parse();
    if let Command::Run(args) = &cli.command {
        return match run::run(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("clustermem run: {e:#}");
                ExitCode::from(125)
            }
        };
    }
    let outcome = match &cli.command {
        Command::Host(args) => run_host(args).map(|()| true),
        Command::Bench(args) => run_bench(args),
        Command::Status(args) => return status::run(args),
        Command::Crashtest { target: CrashTarget::Tx(args) } => run_crashtest_tx(args),
        Command::Run(_) => unreachable!("handled above"),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("clustermem: {e:#}");
            ExitCode::FAILURE
        }
    }
}
