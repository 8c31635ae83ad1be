//! `clustermem run -- CMD`: runs an unmodified program with its large anonymous memory in
//! cluster memory. The program gets `libclustermem_preload.so` through LD_PRELOAD (see the
//! `clustermem-preload` crate); this process serves as its memory host when no `--hosts` are
//! given, forwards termination signals, and exits with the program's status.

use std::collections::HashMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use clustermem_host::MemoryHost;
use clustermem_runtime::{DirtyTracking, PrefetchMode, Redundancy, WritebackMode};
use serde_json::{json, Map, Value};

use crate::size::parse_size;

/// Name of the preload library, next to the `clustermem` binary.
const PRELOAD_LIB: &str = "libclustermem_preload.so";

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:\n  clustermem run --local-mem 256M -- python3 build_index.py\n  \
clustermem run --local-mem 1G --hosts 10.0.0.2:7070,10.0.0.3:7070 -- redis-server --save ''\n\n\
What is routed: private anonymous read-write mappings of at least --min-bytes (mmap, and \
malloc blocks of that size under glibc's allocator; other allocators such as jemalloc map \
their memory with mmap, which is routed). Small allocations, files, shared memory and stacks \
stay local. munmap, mremap and madvise(DONTNEED) behave as on anonymous memory; freed memory \
is freed on the host. System calls that read into routed memory (read(2) and friends) work. \
mlock and mlockall lock the rest of the program's memory; routed memory stays paged.\n\n\
fork: while all of the program's cluster memory that holds data is resident (none evicted \
yet) and within a quarter of --local-mem, a child gets a copy of it (shell subshells and \
pipelines, wrapper scripts). Otherwise a child may exec (subprocesses work, each with cluster \
memory of its own) but cannot use its parent's cluster memory; one that touches it is stopped \
with exit status 70 and a message. --local-mem bounds each process separately.\n\n\
Exit status: the program's (128+N if killed by signal N); 125 if cluster memory could not be \
set up in it; 127 if it could not be started.")]
pub struct RunArgs {
    /// Local memory each process may keep of its cluster memory (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    local_mem: u64,
    /// Memory hosts, comma-separated host:port. None: this process serves as the host.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Write figures (the fields of `bench --json`, summed over the program's processes) to
    /// this file when the program exits. A process killed by a signal runs no exit code: its
    /// figures are those of its last snapshot (taken every second), and the file counts it in
    /// processes_without_final_figures.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Mappings and malloc blocks at least this large go to cluster memory.
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    min_bytes: u64,
    /// Address space reserved for cluster memory in each process (host memory is only taken
    /// for what the program allocates).
    #[arg(long, default_value = "256G", value_parser = parse_size)]
    arena: u64,
    /// Capacity of the embedded host (when no --hosts are given) [default: 64G, or this
    /// machine's RAM and swap if less: a program outgrowing it is refused memory (ENOMEM,
    /// with a message) instead of having the host OOM-killed]
    #[arg(long, value_parser = parse_size)]
    embedded_capacity: Option<u64>,
    /// Busy-poll while faults are outstanding (see `clustermem bench --help`).
    #[arg(long)]
    low_latency: bool,
    /// Write dirty pages back at least this often, in milliseconds (0, the default: only on
    /// eviction: the host copies of a program's memory serve only its own process, so a
    /// flush buys little more than cheaper evictions later). Each flush writes back every
    /// page written since the last: under sync tracking it also write-protects them, so a
    /// program that keeps writing them takes a fault per page per flush (redis SET: 25 K requests/s with
    /// 100 ms, 105 K with 0); under async tracking it sends them whole (redis SET: 69 K with
    /// 100 ms against 76-84 K with 0, bench/run/compare.sh).
    #[arg(long, default_value_t = 0)]
    flush_interval_ms: u64,
    /// Write back changed 64-byte lines (line, the default with sync tracking) or whole
    /// pages (page, the default and only choice with async tracking).
    #[arg(long, value_parser = |s: &str| s.parse::<WritebackMode>().map(|_| s.to_string()))]
    writeback: Option<String>,
    /// How written pages are found: auto (the default: async where the kernel has it and
    /// --writeback line is not asked, else sync), sync (write-protect faults, a handler round
    /// trip per first store to a page; needed for line write-back) or async (Linux 6.8+: the
    /// kernel lets stores in and PAGEMAP_SCAN finds them; whole-page write-back). Under
    /// `run` async was ahead on python and level on redis, in less memory
    /// (bench/run/compare.sh). See `clustermem bench --help`.
    #[arg(long, default_value = "auto", value_parser = parse_tracking)]
    dirty_tracking: String,
    /// Prefetch along sequential and strided miss streams (auto) or not (off).
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<PrefetchMode>().map(|_| s.to_string()))]
    prefetch: String,
    /// Copies or erasure shards on distinct --hosts, to survive losing hosts (see
    /// `clustermem bench --help`): none, replicate:N or erasure:K+M.
    #[arg(long, default_value = "none", value_parser = |s: &str| s.parse::<Redundancy>().map(|_| s.to_string()))]
    redundancy: String,
    /// The program and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let pid = CHILD.load(Ordering::Acquire);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Where the preload library is: `$CLUSTERMEM_PRELOAD`, or beside this executable.
fn preload_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLUSTERMEM_PRELOAD") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("CLUSTERMEM_PRELOAD={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding the clustermem executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let lib = dir.join(PRELOAD_LIB);
    if lib.is_file() {
        return Ok(lib);
    }
    bail!(
        "cannot find {PRELOAD_LIB} next to {}: build the whole workspace (`cargo build --release`), \
         or set CLUSTERMEM_PRELOAD to its path",
        exe.display()
    )
}

/// Runs the program; returns its exit status for ours.
pub fn run(args: &RunArgs) -> Result<u8> {
    clustermem_runtime::check_userfaultfd()?;
    let line = args.writeback.as_deref() == Some("line");
    let erasure = args.redundancy.starts_with("erasure:");
    let tracking = match args.dirty_tracking.as_str() {
        // Line write-back and erasure coding's parity updates need sync tracking's twins.
        "auto" if !line && !erasure && clustermem_runtime::async_dirty_tracking_available() => {
            DirtyTracking::Async
        }
        "auto" => DirtyTracking::Sync,
        other => other.parse().map_err(anyhow::Error::msg)?,
    };
    if tracking == DirtyTracking::Async && erasure {
        bail!(
            "--redundancy {} updates parity by the change of each written page, from the clean \
             copy sync dirty tracking takes at its first store: use --dirty-tracking sync (or auto)",
            args.redundancy
        );
    }
    if tracking == DirtyTracking::Async && line {
        bail!(
            "--writeback line diffs each page against a twin taken at its first store, which \
             --dirty-tracking async never sees: use --writeback page with it, or sync tracking"
        );
    }
    let lib = preload_library()?;
    if args.local_mem < 4096 {
        bail!("--local-mem {} is less than one page", args.local_mem);
    }
    let (_host, hosts) = if args.hosts.is_empty() {
        let capacity = args.embedded_capacity.unwrap_or_else(clustermem_runtime::default_embedded_capacity);
        let host = MemoryHost::bind("127.0.0.1:0", capacity)?.spawn();
        let addr = host.addr().to_string();
        (Some(host), addr)
    } else {
        (None, args.hosts.join(","))
    };
    let stats_dir = args.stats_json.as_ref().map(|_| StatsDir::create()).transpose()?;
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", lib.display()),
        _ => lib.display().to_string(),
    };
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("CLUSTERMEM_HOSTS", &hosts)
        .env("CLUSTERMEM_LOCAL_MEM", args.local_mem.to_string())
        .env("CLUSTERMEM_ARENA", args.arena.to_string())
        .env("CLUSTERMEM_MIN_BYTES", args.min_bytes.to_string())
        .env("CLUSTERMEM_LOW_LATENCY", if args.low_latency { "1" } else { "0" })
        .env("CLUSTERMEM_FLUSH_INTERVAL_MS", args.flush_interval_ms.to_string())
        .env(
            "CLUSTERMEM_WRITEBACK",
            args.writeback.as_deref().unwrap_or(match tracking {
                DirtyTracking::Async => "page",
                DirtyTracking::Sync => "line",
            }),
        )
        .env("CLUSTERMEM_DIRTY_TRACKING", tracking.to_string())
        .env("CLUSTERMEM_PREFETCH", &args.prefetch)
        .env("CLUSTERMEM_REDUNDANCY", &args.redundancy);
    if let Some(dir) = &stats_dir {
        cmd.env("CLUSTERMEM_STATS_DIR", &dir.0);
    }
    // SAFETY: between fork and exec the child only resets signal dispositions and sets its
    // parent-death signal (async-signal safe), so the program starts with the defaults a
    // shell would give it.
    unsafe {
        let embedded = args.hosts.is_empty();
        cmd.pre_exec(move || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            if embedded {
                // This process holds the program's memory: if it dies, so must the program
                // (it would otherwise fail page by page).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clustermem run: cannot start {}: {e}", args.command[0]);
            return Ok(127);
        }
    };
    CHILD.store(i32::try_from(child.id()).unwrap_or(0), Ordering::Release);
    // Like a shell running a foreground job: the terminal's SIGINT/SIGQUIT reach the program
    // directly, so we ignore them; SIGTERM/SIGHUP sent to us are passed on.
    // SAFETY: installs dispositions whose handler only calls kill(2).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, forward_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, forward_signal as *const () as libc::sighandler_t);
    }
    let status = child.wait().context("waiting for the program")?;
    let wall = started.elapsed().as_secs_f64();
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(sig)) => {
            let why = if sig == libc::SIGBUS {
                " (a page of its cluster memory was lost: a memory host failed)"
            } else {
                ""
            };
            eprintln!("clustermem run: {} was killed by signal {sig}{why}", args.command[0]);
            u8::try_from(128 + sig).unwrap_or(255)
        }
        (None, None) => 1,
    };
    if let (Some(path), Some(dir)) = (&args.stats_json, &stats_dir) {
        let facts = RunFacts { hosts: &hosts, tracking, wall_s: wall, exit_code: code };
        let report = merge_stats(&dir.0, args, &facts)?;
        std::fs::write(path, format!("{report}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(code)
}

/// The folder the program's processes write their figures to (`--stats-json`), removed when
/// the run ends, however it ends short of a kill.
struct StatsDir(PathBuf);

impl StatsDir {
    const PREFIX: &'static str = "clustermem-run-";

    /// Creates `clustermem-run-PID` in the temporary folder, empty. Folders left by runs that
    /// were killed (whose process is gone) are removed first: one of them could carry this
    /// run's PID, and its figures would be counted as this run's.
    fn create() -> Result<Self> {
        let own = std::process::id().to_string();
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(Self::PREFIX)) else { continue };
                if pid.parse::<u32>().is_ok() && (pid == own || !Path::new("/proc").join(pid).exists()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = tmp.join(format!("{}{own}", Self::PREFIX));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for StatsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `clustermem run` knows of the run besides its processes' figures.
struct RunFacts<'a> {
    hosts: &'a str,
    tracking: DirtyTracking,
    wall_s: f64,
    exit_code: u8,
}

/// Sums the figures the program's processes wrote (at exit, or in their last snapshot if they
/// were killed) into one object with the fields of `bench --json`. Latency percentiles are
/// those of the process image that took the most faults.
fn merge_stats(dir: &Path, args: &RunArgs, run: &RunFacts) -> Result<Value> {
    const SUMMED: [&str; 18] = [
        "size_bytes",
        "faults",
        "remote_faults",
        "zero_faults",
        "rescued_faults",
        "write_faults",
        "pages_fetched",
        "pages_evicted",
        "pages_written_back",
        "bytes_fetched",
        "bytes_written_back",
        "dirty_lines_written",
        "page_granular_bytes",
        "pages_flushed",
        "tracking_scans",
        "prefetch_issued",
        "prefetch_used",
        "prefetch_wasted",
    ];
    let mut totals: Map<String, Value> = SUMMED.iter().map(|k| (k.to_string(), json!(0u64))).collect();
    let mut busiest: Option<Value> = None;
    let mut errors = Vec::new();
    // Per process: its last program image (they exec'd one another) and whether that one
    // wrote its final figures.
    let mut last_image: HashMap<u64, (u128, bool)> = HashMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        // `PID-IMAGE.json`; a `.json.part` is a write cut short by a kill.
        let Some((pid, image)) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, i)| Some((p.parse::<u64>().ok()?, i.parse::<u128>().ok()?)))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let one: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let last = last_image.entry(pid).or_insert((image, false));
        if image >= last.0 {
            *last = (image, one["final"].as_bool().unwrap_or(false));
        }
        for k in SUMMED {
            let sum = totals[k].as_u64().unwrap_or(0) + one[k].as_u64().unwrap_or(0);
            totals.insert(k.to_string(), json!(sum));
        }
        if let Some(e) = one["region_error"].as_str() {
            errors.push(format!("{}: {e}", one["pid"]));
        }
        if busiest.as_ref().is_none_or(|b| one["faults"].as_u64() > b["faults"].as_u64()) {
            busiest = Some(one);
        }
    }
    let busiest = busiest.unwrap_or(Value::Null);
    totals.insert("processes".into(), json!(last_image.len()));
    let cut_short = last_image.values().filter(|(_, last)| !last).count();
    if cut_short > 0 {
        eprintln!(
            "clustermem run: {cut_short} process(es) ended without running exit handlers (killed by a \
             signal, or _exit): their figures in --stats-json are as of their last snapshot, taken \
             every second"
        );
    }
    totals.insert("processes_without_final_figures".into(), json!(cut_short));
    totals.insert("workload".into(), json!("run"));
    totals.insert("command".into(), json!(args.command.join(" ")));
    totals.insert("backend".into(), json!("clustermem"));
    totals.insert("local_mem_bytes".into(), json!(args.local_mem));
    totals.insert("hosts".into(), json!(run.hosts.split(',').collect::<Vec<_>>()));
    totals.insert("dirty_tracking".into(), json!(run.tracking.to_string()));
    totals.insert("embedded_host".into(), json!(args.hosts.is_empty()));
    totals.insert("ops".into(), Value::Null);
    totals.insert("wall_s".into(), json!(run.wall_s));
    totals.insert("fault_p50_us".into(), busiest["service_p50_us"].clone());
    totals.insert("fault_p99_us".into(), busiest["service_p99_us"].clone());
    totals.insert("fault_latency_source".into(), json!("handler"));
    totals.insert("exit_code".into(), json!(run.exit_code));
    totals.insert("verified".into(), Value::Null);
    totals.insert("region_errors".into(), json!(errors));
    Ok(Value::Object(totals))
}

fn parse_tracking(s: &str) -> Result<String, String> {
    match s {
        "auto" => Ok(s.to_string()),
        _ => s.parse::<DirtyTracking>().map(|_| s.to_string()).map_err(|e| format!("{e}, or auto")),
    }
}
