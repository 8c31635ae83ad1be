//! `clustermem run` with real programs: python3 building structures larger than local memory,
//! system calls into cluster memory, fork, exit statuses, and redis-server driven by
//! redis-benchmark with every key read back.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, output_with_timeout, require_userfaultfd, run_with_timeout, stderr};

/// Builds `libclustermem_preload.so` next to the `clustermem` binary under test: `cargo test`
/// builds the binary but not the workspace's cdylib, and a stale library would test old code.
fn require_preload_library() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-p", "clustermem-preload"]);
        if !cfg!(debug_assertions) {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("running cargo to build the preload library");
        assert!(status.success(), "building libclustermem_preload.so failed");
    });
}

fn program(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs").join(name).display().to_string()
}

/// Debian's python3 (not a version-manager shim, which would run several processes).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn require_program(name: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()));
    assert!(found, "this test needs `{name}` (Debian: apt-get install redis-server redis-tools python3; .ci/run installs them)");
}

fn stats_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("clustermem-test-{tag}-{}.json", std::process::id()))
}

fn read_stats(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("stats are one JSON object")
}

/// Asserts that the program run to `out` succeeded and printed exactly `expected`.
fn assert_printed(out: &Output, expected: &str) {
    assert!(out.status.success(), "{:?} {}", out.status, stderr(out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{}", stderr(out));
}

fn maxrss_kb(out: &Output) -> u64 {
    stderr(out)
        .lines()
        .find_map(|l| l.strip_prefix("maxrss_kb "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss line in {}", stderr(out)))
}

/// Runs structures.py with `n` plainly and under `clustermem run --local-mem 16M` with
/// `flags`, checks both succeed with the same output, and returns both runs and the stats.
fn python_both_ways(tag: &str, n: &str, flags: &[&str]) -> (Output, Output, serde_json::Value) {
    let script = program("structures.py");
    let plain = Command::new(python()).args([&script, n]).output().expect("running python3");
    assert!(plain.status.success(), "plain python3 failed: {}", stderr(&plain));
    let stats = stats_path(tag);
    let mut argv = vec!["run", "--local-mem", "16M", "--stats-json", stats.to_str().unwrap()];
    argv.extend_from_slice(flags);
    argv.extend_from_slice(&["--", python(), &script, n]);
    let run = run_with_timeout(&argv, Duration::from_secs(240));
    assert!(run.status.success(), "under clustermem run: {:?} {}", run.status, stderr(&run));
    assert_eq!(run.stdout, plain.stdout, "same checksum with and without clustermem");
    let s = read_stats(&stats);
    assert_eq!(s["region_errors"].as_array().unwrap().len(), 0, "{s}");
    (plain, run, s)
}

/// Python structures ~10x the local limit: the same output as an ordinary run, in much less
/// resident memory, with the pages really going through the host.
#[test]
fn python_structures_larger_than_local_memory_match_an_ordinary_run() {
    require_userfaultfd();
    require_preload_library();
    let (plain, run, s) = python_both_ways("python", "1500000", &[]);
    let (plain_kb, run_kb) = (maxrss_kb(&plain), maxrss_kb(&run));
    assert!(run_kb * 2 < plain_kb, "peak RSS {run_kb} KiB under clustermem vs {plain_kb} KiB plain");
    assert_eq!(s["exit_code"], 0);
    assert_eq!(s["processes"], 1, "{s}");
    assert!(s["size_bytes"].as_u64().unwrap() > 8 * (16 << 20), "cluster memory used: {s}");
    assert!(s["pages_evicted"].as_u64().unwrap() > 10_000, "{s}");
    assert!(s["bytes_fetched"].as_u64().unwrap() > 0, "{s}");
    for field in ["workload", "size_bytes", "local_mem_bytes", "ops", "wall_s", "faults", "fault_p50_us"] {
        assert!(s.get(field).is_some(), "stats lack {field}: {s}");
    }
    assert_eq!(s["processes_without_final_figures"], 0, "{s}");
}

/// A signal the program blocks in its threads stays pending, as without clustermem: the
/// runtime's own threads (the fault handler above all) block every signal, so none is
/// delivered to them and no program handler runs on them.
#[test]
fn a_signal_the_program_blocks_stays_pending() {
    require_userfaultfd();
    require_preload_library();
    let script = "import os, signal, time\n\
                  ran = []\n\
                  signal.signal(signal.SIGUSR1, lambda *a: ran.append(1))\n\
                  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n\
                  b = bytearray(8 << 20)\n\
                  os.kill(os.getpid(), signal.SIGUSR1)\n\
                  time.sleep(0.3)\n\
                  print('ran' if ran else 'pending' if signal.SIGUSR1 in signal.sigpending() else 'lost')\n";
    let plain = Command::new(python()).args(["-c", script]).output().expect("running python3");
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "pending\n", "without clustermem");
    let out = run_with_timeout(
        &["run", "--local-mem", "4M", "--", python(), "-c", script],
        Duration::from_secs(60),
    );
    assert_printed(&out, "pending\n");
}

/// A program that locks all its memory (`mlockall`, as memcached -k or gpg do) keeps running:
/// the kernel would fault in the arena's whole reservation to lock it, and evict none of it
/// again. Its other memory is locked; its cluster memory stays paged, and says so.
#[test]
fn mlockall_locks_the_programs_memory_but_not_cluster_memory() {
    require_userfaultfd();
    require_preload_library();
    let stats = stats_path("mlockall");
    let script = "import ctypes\n\
                  libc = ctypes.CDLL(None, use_errno=True)\n\
                  a = bytearray(32 << 20)\n\
                  for i in range(0, len(a), 4096): a[i] = 7\n\
                  assert libc.mlockall(3) == 0, ctypes.get_errno()\n\
                  b = bytearray(32 << 20)\n\
                  for i in range(0, len(b), 4096): b[i] = 9\n\
                  locked = [l for l in open('/proc/self/status') if l.startswith('VmLck')][0].split()[1]\n\
                  print(sum(a[::4096]) + sum(b[::4096]), int(locked) > 0)\n";
    let out = run_with_timeout(
        &["run", "--local-mem", "8M", "--stats-json", stats.to_str().unwrap(), "--", python(), "-c", script],
        Duration::from_secs(60),
    );
    assert_printed(&out, &format!("{} True\n", 8192 * 7 + 8192 * 9));
    assert!(stderr(&out).contains("not locked"), "{}", stderr(&out));
    let s = read_stats(&stats);
    assert!(s["pages_evicted"].as_u64().unwrap() > 8192, "cluster memory still paged: {s}");
}

/// The embedded host offers at most this machine's RAM and swap: a program asking for more
/// gets ENOMEM (python: MemoryError), as it would without clustermem, instead of a host that
/// accepts it and is OOM-killed once the program fills it.
#[test]
fn a_program_asking_for_more_than_the_machine_has_is_refused_memory() {
    require_userfaultfd();
    require_preload_library();
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("reading /proc/meminfo");
    let kib: u64 = meminfo
        .lines()
        .filter(|l| l.starts_with("MemTotal:") || l.starts_with("SwapTotal:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    let gib = kib / (1 << 20) + 2;
    let script = format!("try:\n    b = bytearray({gib} << 30)\n    print('allocated')\nexcept MemoryError:\n    print('refused')\n");
    let out = run_with_timeout(
        &["run", "--local-mem", "16M", "--", python(), "-c", &script],
        Duration::from_secs(120),
    );
    assert_printed(&out, "refused\n");
    assert!(stderr(&out).contains("host is full"), "{}", stderr(&out));
}

/// A program killed by a signal runs no exit code, so it cannot write its figures then:
/// `--stats-json` still has them, from the snapshot each process writes every second, and
/// says that they are a snapshot.
#[test]
fn a_program_killed_by_a_signal_still_reports_its_figures() {
    require_userfaultfd();
    require_preload_library();
    let stats = stats_path("killed");
    // 64 MiB written through 16 MiB of local memory, then a snapshot's time, then SIGKILL.
    let script = "import os, signal, time\n\
                  b = bytearray(64 << 20)\n\
                  for i in range(0, len(b), 4096): b[i] = 1\n\
                  time.sleep(1.5)\n\
                  os.kill(os.getpid(), signal.SIGKILL)\n";
    let out = run_with_timeout(
        &["run", "--local-mem", "16M", "--stats-json", stats.to_str().unwrap(), "--", python(), "-c", script],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(128 + 9), "{}", stderr(&out));
    assert!(stderr(&out).contains("last snapshot"), "the report says it is a snapshot: {}", stderr(&out));
    let s = read_stats(&stats);
    assert_eq!(s["exit_code"], 137, "{s}");
    assert_eq!(s["processes"], 1, "{s}");
    assert_eq!(s["processes_without_final_figures"], 1, "{s}");
    assert!(s["size_bytes"].as_u64().unwrap() >= 64 << 20, "the bytearray is in cluster memory: {s}");
    assert!(s["pages_evicted"].as_u64().unwrap() > 8192, "its paging is counted: {s}");
}

/// `clustermem run` itself killed with SIGKILL leaves its figures folder behind; the next run
/// with `--stats-json` removes it (its process is gone), so such folders do not pile up, and a
/// later run given the same PID could not count their figures as its own.
#[test]
fn a_killed_runs_figures_folder_is_removed_by_the_next_run() {
    require_userfaultfd();
    require_preload_library();
    let stats = stats_path("killed-run");
    let mut killed = Command::new(bin())
        .args(["run", "--stats-json", stats.to_str().unwrap(), "--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let left = std::env::temp_dir().join(format!("clustermem-run-{}", killed.id()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !left.exists() {
        assert!(Instant::now() < deadline, "{} was never created", left.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(left.exists(), "a SIGKILLed run cannot clean up after itself");
    let out = run_with_timeout(
        &["run", "--stats-json", stats.to_str().unwrap(), "--", "true"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!left.exists(), "{} outlived the run that left it", left.display());
    assert_eq!(read_stats(&stats)["exit_code"], 0);
}

/// The same program under sync dirty tracking (the default is async where the kernel has
/// it) with the periodic flusher on: first stores fault to the handler, pages are written
/// back while the program keeps writing them, and the output still matches an ordinary run.
#[test]
fn python_under_sync_dirty_tracking_matches_an_ordinary_run() {
    require_userfaultfd();
    require_preload_library();
    let flags = ["--dirty-tracking", "sync", "--flush-interval-ms", "50"];
    let (_, _, s) = python_both_ways("python-sync", "800000", &flags);
    assert!(s["pages_evicted"].as_u64().unwrap() > 5_000, "{s}");
    assert!(s["write_faults"].as_u64().unwrap() > 0, "{s}");
    assert!(s["pages_flushed"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["tracking_scans"], 0, "{s}");
}

/// Line write-back needs sync tracking's twins: asking for it with async tracking is refused
/// before the program starts, and `auto` tracking picks sync when line write-back is asked.
#[test]
fn line_write_back_with_async_tracking_is_refused_and_auto_picks_sync() {
    require_userfaultfd();
    require_preload_library();
    let out = run_with_timeout(
        &["run", "--dirty-tracking", "async", "--writeback", "line", "--", "/bin/true"],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--writeback page"), "{}", stderr(&out));
    let stats = stats_path("auto-line");
    let out = run_with_timeout(
        &["run", "--writeback", "line", "--stats-json", stats.to_str().unwrap(), "--", "/bin/true"],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_stats(&stats)["dirty_tracking"], "sync");
}

/// An unmodified program survives a memory host killed under it: `redundancy` over three
/// host processes, one SIGKILLed mid-run; the output matches an ordinary run.
fn python_survives_a_killed_host(redundancy: &str) {
    require_userfaultfd();
    require_preload_library();
    let script = program("structures.py");
    let plain = Command::new(python()).args([&script, "800000"]).output().expect("running python3");
    assert!(plain.status.success(), "plain python3 failed: {}", stderr(&plain));
    let mut hosts: Vec<common::HostProcess> = (0..3).map(|_| common::HostProcess::start("1G")).collect();
    let list = hosts.iter().map(|h| h.addr.clone()).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--local-mem", "16M", "--hosts", &list, "--redundancy", redundancy, "--"]);
    cmd.args([python(), &script, "800000"]);
    let run = std::thread::spawn(move || output_with_timeout(cmd, Duration::from_secs(240)));
    std::thread::sleep(Duration::from_millis(1500));
    hosts[1].kill9();
    let run = run.join().expect("the run thread");
    let err = stderr(&run);
    assert!(run.status.success(), "under clustermem run: {:?} {err}", run.status);
    // Said as "memory host A failed" or "send to A failed", by whichever path saw it first.
    let lost = err.lines().any(|l| l.contains(&hosts[1].addr) && l.contains("failed"));
    assert!(lost, "the host was lost mid-run: {err}");
    assert_eq!(run.stdout, plain.stdout, "same checksum with and without a lost host");
}

#[test]
fn python_survives_a_killed_host_with_replicate_2() {
    python_survives_a_killed_host("replicate:2");
}

/// Python frees and reuses memory all the time: discards of parts of stripe rows, zeroed
/// through parity, under a real program, with a host lost.
#[test]
fn python_survives_a_killed_host_with_erasure_2_1() {
    python_survives_a_killed_host("erasure:2+1");
}

/// read(2) into routed memory and write(2) from evicted routed memory are served; mmap,
/// mremap, madvise(DONTNEED) and munmap behave as the kernel's.
#[test]
fn system_calls_and_the_mmap_family_work_on_cluster_memory() {
    require_userfaultfd();
    require_preload_library();
    let out = run_with_timeout(
        &["run", "--local-mem", "2M", "--", python(), &program("kernel_access.py")],
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{text}\n{}", out.status, stderr(&out));
    for step in ["read into", "write from evicted", "mremap", "routed", "madvise", "munmap"] {
        assert!(text.contains(&format!("OK {step}")), "missing step {step}: {text}");
    }
}

/// Once the parent's data has been evicted (8 MiB written under a 2 MiB limit), a child
/// that only execs works; one that touches its parent's cluster memory is stopped with
/// status 70 and a message, never handed zeros.
#[test]
fn fork_children_may_exec_but_not_touch_the_parents_cluster_memory() {
    require_userfaultfd();
    require_preload_library();
    let out = run_with_timeout(
        &["run", "--local-mem", "2M", "--", python(), &program("fork.py")],
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{text}\n{}", out.status, stderr(&out));
    assert!(text.contains("subprocess ok"), "{text}");
    assert!(text.contains("child exit 70"), "{text}");
    assert!(text.contains("parent ok"), "{text}");
    assert!(stderr(&out).contains("forked child touched its parent's cluster memory"), "{}", stderr(&out));
}

/// While every page holding data is resident (none ever evicted), a forked child gets a
/// copy of its parent's cluster memory: python's child and grandchild read it, their stores
/// stay theirs, and the parent pages on afterwards (eviction paused only for the fork). A
/// shell's command substitutions and pipelines, forks all, work the same way.
#[test]
fn fork_children_share_a_copy_while_everything_is_resident() {
    require_userfaultfd();
    require_preload_library();
    let stats = stats_path("fork-shared");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--local-mem", "32M", "--stats-json", stats.to_str().unwrap(), "--", python()])
        .arg(program("fork_shared.py"))
        .env("LOCAL_MIB", "32");
    let out = output_with_timeout(cmd, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{text}\n{}", out.status, stderr(&out));
    assert!(text.contains("child read the parent's memory") && text.contains("parent ok"), "{text}");
    let s = read_stats(&stats);
    assert!(s["pages_evicted"].as_u64().unwrap() > 8192, "the parent paged after the fork: {s}");

    let script = r#"x=$(echo sub); for i in 1 2 3; do y=$(seq 1 $i | wc -l); x="$x $y"; done; (echo "$x"; echo pipe) | cat"#;
    let out = run_with_timeout(
        &["run", "--local-mem", "32M", "--", "/bin/bash", "-c", script],
        Duration::from_secs(60),
    );
    assert_printed(&out, "sub 1 2 3\npipe\n");
}

/// calloc returns zeros whatever block it reuses: a block freed dirty and handed out again
/// by calloc, at sizes from a few bytes to just under `--min-bytes` (small blocks of several
/// pages too: only those under a page were cleared, and python, whose arena map is
/// calloc'd, crashed now and then when it got a dirty one).
#[test]
fn calloc_clears_reused_blocks_of_every_size() {
    require_userfaultfd();
    require_preload_library();
    let script = r#"
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.calloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
for size in (16, 100, 4000, 4096, 8192, 65536, 200000, 262000):
    p = libc.malloc(size)
    ctypes.memset(p, 0xAB, size)
    libc.free(p)
    q = libc.calloc(1, size)
    assert ctypes.string_at(q, size) == bytes(size), "calloc(%d) reused a dirty block" % size
    libc.free(q)
print("calloc ok")
"#;
    let out = run_with_timeout(&["run", "--", python(), "-c", script], Duration::from_secs(60));
    assert_printed(&out, "calloc ok\n");
}

/// A program with an allocator of its own (jemalloc, as redis has) gets its `malloc` calls
/// forwarded, and that allocator's blocks lie in cluster memory. std allocates a thread's
/// parking state through `malloc`, and the fault handler unparks threads waiting on it: were
/// that state in cluster memory and evicted, the handler would fault on it and wait for
/// itself (redis under `run` hung so). Without the local heap this run hung in 4 runs of 4.
#[test]
fn a_program_with_its_own_allocator_never_hangs_the_fault_handler() {
    require_userfaultfd();
    require_preload_library();
    let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    assert!(
        Path::new(jemalloc).exists(),
        "{jemalloc} is missing: install libjemalloc2 (redis-server depends on it; .ci/run installs it)"
    );
    let script = program("own_allocator.py");
    let ordinary = Command::new(python()).args([&script, "60000"]).output().expect("running python");
    assert!(ordinary.status.success(), "{}", stderr(&ordinary));
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--local-mem", "4M", "--", python(), &script, "60000"])
        .env("LD_PRELOAD", jemalloc)
        // Freed memory is purged at once, by jemalloc's own background thread too.
        .env("MALLOC_CONF", "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0");
    let out = output_with_timeout(cmd, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "{:?} (killed after 90 s: the fault handler waits for itself?) {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(out.stdout, ordinary.stdout, "the same digest as an ordinary run");
}

/// The program's exit status is ours; a signal death is 128+N; a missing program is 127.
#[test]
fn exit_statuses_pass_through() {
    require_userfaultfd();
    require_preload_library();
    let check = |args: &[&str], want: i32| {
        let out = run_with_timeout(args, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(want), "{args:?}: {:?}\n{}", out.status, stderr(&out));
    };
    check(&["run", "--", "sh", "-c", "exit 7"], 7);
    check(&["run", "--", "sh", "-c", "kill -TERM $$"], 128 + 15);
    check(&["run", "--", "/nonexistent/program"], 127);
    let missing = Command::new(bin())
        .args(["run", "--", "true"])
        .env("CLUSTERMEM_PRELOAD", "/nonexistent/libclustermem_preload.so")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(125));
    assert!(stderr(&missing).contains("is not a file"), "{}", stderr(&missing));
    let out = run_with_timeout(&["run", "--local-mem", "12Q", "--", "true"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "a bad flag is a usage error");
    assert!(stderr(&out).contains("unknown unit"), "{}", stderr(&out));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let mut buf = [0u8; 7];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A program started under `clustermem run` for a test: stopped (SIGTERM, which `clustermem
/// run` passes on, then SIGKILL) if the test ends without waiting for it.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let pid = i32::try_from(self.0.id()).expect("pid");
            // SAFETY: kill(2) on our own child, which has not been reaped (try_wait said so).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// redis-server under clustermem run with a local limit well below its ~100 MB dataset,
/// loaded by redis-benchmark and a checker, every key read back and verified.
#[test]
fn redis_server_keeps_every_key_with_a_small_local_limit() {
    require_userfaultfd();
    require_preload_library();
    for p in ["redis-server", "redis-benchmark", "redis-cli"] {
        require_program(p);
    }
    let port = free_port().to_string();
    let stats = stats_path("redis");
    let log = stats_path("redis-log");
    let mut server = Background(
        Command::new(bin())
            .args(["run", "--local-mem", "24M", "--stats-json", stats.to_str().unwrap(), "--"])
            .args([
                "redis-server",
                "--port",
                &port,
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("creating the server log"))
            .spawn()
            .expect("starting redis-server under clustermem run"),
    );
    let server_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let port_n: u16 = port.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !redis_ping(port_n) {
        assert!(Instant::now() < deadline, "redis-server did not answer PING: {}", server_log());
        assert!(server.0.try_wait().unwrap().is_none(), "redis-server exited early: {}", server_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut bench = Command::new("redis-benchmark");
    bench.args(["-p", &port, "-t", "set", "-n", "60000", "-r", "60000", "-d", "256", "-q"]);
    let bench = output_with_timeout(bench, Duration::from_secs(120));
    assert!(bench.status.success(), "redis-benchmark: {} / server: {}", stderr(&bench), server_log());
    let mut check = Command::new(python());
    check.args([&program("redis_check.py"), &port, "60000", "1024", "256"]);
    let check = output_with_timeout(check, Duration::from_secs(120));
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "verification failed: {report} {} / server: {}",
        stderr(&check),
        server_log()
    );
    assert!(report.contains("verified 60000 keys"), "{report}");
    let mut shutdown = Command::new("redis-cli");
    shutdown.args(["-p", &port, "shutdown", "nosave"]);
    output_with_timeout(shutdown, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "redis-server did not stop on SHUTDOWN: {}", server_log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "redis-server under clustermem run ended with {status:?}: {}", server_log());
    let _ = std::fs::remove_file(&log);
    let s = read_stats(&stats);
    assert!(s["size_bytes"].as_u64().unwrap() > 3 * (24 << 20), "the dataset lives in cluster memory: {s}");
    assert!(s["pages_evicted"].as_u64().unwrap() > 1000, "{s}");
    assert!(s["pages_fetched"].as_u64().unwrap() > 0, "{s}");
}

/// GNU sort with two threads sorting in a large malloc'd buffer, far over the local limit:
/// the same bytes out as an ordinary run.
#[test]
fn threaded_sort_matches_an_ordinary_run() {
    require_userfaultfd();
    require_preload_library();
    let dir = std::env::temp_dir().join(format!("clustermem-sort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("lines.txt");
    let mut text = String::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..200_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{x:016x} {i}\n"));
    }
    std::fs::write(&input, text).unwrap();
    let args = ["-S", "16M", "--parallel=2", input.to_str().unwrap()];
    let plain = Command::new("sort").args(args).output().expect("running sort");
    assert!(plain.status.success());
    let mut run_args = vec!["run", "--local-mem", "4M", "--", "sort"];
    run_args.extend(args);
    let run = run_with_timeout(&run_args, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "{:?} {}", run.status, stderr(&run));
    assert!(run.stdout == plain.stdout, "sort output differs under clustermem run");
}
