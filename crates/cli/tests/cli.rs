//! The `clustermem` command as a user runs it: bench against the embedded host and against
//! real host processes, clean host shutdown, and clear errors for bad input.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{json, process_state, require_userfaultfd, run_with_timeout, stderr, HostProcess};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn every_workload_verifies_against_the_embedded_host() {
    require_userfaultfd();
    for workload in ["seq-read", "seq-write", "random", "zipf", "quicksort", "stride", "list-walk", "bfs"] {
        let out =
            run_with_timeout(&["bench", workload, "--size", "16M", "--local-mem", "25%", "--json"], TIMEOUT);
        assert!(out.status.success(), "{workload}: {}", stderr(&out));
        let r = json(&out);
        assert_eq!(r["workload"], workload);
        assert_eq!(r["verified"], true, "{workload}: {r}");
        assert_eq!(r["size_bytes"], 16 << 20);
        assert_eq!(r["local_mem_bytes"], 4 << 20);
        for field in
            ["ops", "wall_s", "faults", "fault_p50_us", "fault_p99_us", "pages_fetched", "pages_evicted"]
        {
            assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{workload}: {field} in {r}");
        }
        for field in ["bytes_fetched", "bytes_written_back", "setup_s"] {
            assert!(r[field].is_number(), "{workload}: {field} in {r}");
        }
    }
}

/// The embedded host of `bench` is a child process (so it shares no address space with the
/// runtime, like a real host): it serves the run, and a bench killed with SIGKILL leaves no
/// host behind.
#[test]
fn the_embedded_host_is_a_child_that_dies_with_bench() {
    require_userfaultfd();
    let mut bench = std::process::Command::new(common::bin())
        .args(["bench", "random", "--size", "256M", "--local-mem", "25%", "--ops", "100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let children = || -> Vec<u32> {
        let list = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", bench.id()));
        list.unwrap_or_default().split_whitespace().map(|p| p.parse().unwrap()).collect()
    };
    let cmdline = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ")
    };
    // The child shows bench's command line until it has exec'd.
    let started = std::time::Instant::now();
    let host = loop {
        if let Some(&pid) = children().iter().find(|&&pid| cmdline(pid).contains("host --listen 127.0.0.1:0"))
        {
            break pid;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no child host appeared under bench");
        std::thread::sleep(Duration::from_millis(20));
    };
    bench.kill().unwrap();
    bench.wait().unwrap();
    // Dead once the kernel's parent-death signal killed it: gone, or a zombie awaiting a
    // reaper (a container's first process may not reap).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{host}/stat"))
            .is_ok_and(|stat| process_state(&stat) != Some('Z'))
    };
    let killed = std::time::Instant::now();
    while alive() {
        assert!(killed.elapsed() < Duration::from_secs(10), "host {host} outlived its bench");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bench_uses_remote_hosts_and_threads() {
    require_userfaultfd();
    let a = HostProcess::start("64M");
    let b = HostProcess::start("64M");
    let hosts = format!("{},{}", a.addr, b.addr);
    let out = run_with_timeout(
        &[
            "bench",
            "random",
            "--size",
            "32M",
            "--local-mem",
            "4M",
            "--hosts",
            &hosts,
            "--threads",
            "2",
            "--json",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["embedded_host"], false);
    assert!(r["remote_faults"].as_u64().unwrap() > 1000, "{r}");
}

#[test]
fn host_exits_cleanly_on_sigterm() {
    let mut host = HostProcess::start("16M");
    let status = host.terminate(Duration::from_secs(5)).expect("host exits within 5 s of SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// A capacity of 0 is refused; one beyond the machine's RAM and swap is served with a warning
/// that filling it would get the host OOM-killed.
#[test]
fn host_capacity_is_checked_against_the_machine() {
    let out = run_with_timeout(&["host", "--listen", "127.0.0.1:0", "--capacity", "0"], TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("capacity 0"), "{}", stderr(&out));

    let mut host = std::process::Command::new(common::bin())
        .args(["host", "--listen", "127.0.0.1:0", "--capacity", "1000T"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting a host");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(host.stderr.take().unwrap()));
    let started = lines.next().expect("a first line").unwrap();
    let warning = lines.next().expect("a second line").unwrap();
    host.kill().unwrap();
    host.wait().unwrap();
    assert!(started.contains("serving 1000.0 TiB"), "{started}");
    assert!(warning.contains("WARNING") && warning.contains("OOM"), "{warning}");
}

/// Garbage on one connection closes that connection with an error frame; the host keeps
/// serving a well-behaved client.
#[test]
fn host_survives_malformed_frames() {
    require_userfaultfd();
    let host = HostProcess::start("64M");
    let mut bad = TcpStream::connect(&host.addr).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: clustermem\r\n\r\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    let _ = bad.read_to_end(&mut reply);
    assert!(reply.len() > 24, "expected an error frame before the close");
    assert!(String::from_utf8_lossy(&reply).contains("malformed frame"), "{reply:?}");
    let out = run_with_timeout(
        &["bench", "seq-read", "--size", "8M", "--local-mem", "2M", "--hosts", &host.addr, "--json"],
        TIMEOUT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["verified"], true);
}

#[test]
fn unreachable_host_fails_fast_with_its_address() {
    require_userfaultfd();
    let out = run_with_timeout(&["bench", "random", "--size", "8M", "--hosts", "127.0.0.1:1"], TIMEOUT);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("127.0.0.1:1") && err.contains("unreachable"), "{err}");
}

/// A wrong port that some other server answers on (here one speaking HTTP) is named as not a
/// memory host, not as unreachable.
#[test]
fn a_server_that_is_not_a_memory_host_is_named_so() {
    require_userfaultfd();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("the client connects");
        let mut request = [0u8; 64];
        let _ = conn.read(&mut request);
        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    let out = run_with_timeout(&["bench", "random", "--size", "8M", "--hosts", &addr], TIMEOUT);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&addr) && err.contains("not as a clustermem memory host"), "{err}");
}

#[test]
fn full_host_is_a_clear_error() {
    require_userfaultfd();
    let host = HostProcess::start("8M");
    let out = run_with_timeout(&["bench", "random", "--size", "64M", "--hosts", &host.addr], TIMEOUT);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("host is full"), "{}", stderr(&out));
}

/// Runs a long `bench random` against one host process and, 1.5 s in, does `fail` to the host;
/// returns the run's output.
fn fail_host_mid_run(fail: impl FnOnce(&mut HostProcess)) -> std::process::Output {
    let mut host = HostProcess::start("256M");
    let addr = host.addr.clone();
    let runner = std::thread::spawn(move || {
        run_with_timeout(
            &[
                "bench",
                "random",
                "--size",
                "64M",
                "--local-mem",
                "8M",
                "--ops",
                "100000000",
                "--hosts",
                &addr,
            ],
            TIMEOUT,
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    fail(&mut host);
    let out = runner.join().unwrap();
    // A stopped host must run again to be terminated when `host` drops.
    host.signal(libc::SIGCONT);
    out
}

/// A host killed mid-run makes the benchmark fail with a message, never hang.
#[test]
fn host_killed_mid_run_fails_the_run() {
    require_userfaultfd();
    let out = fail_host_mid_run(HostProcess::kill9);
    assert!(!out.status.success(), "the run must fail once its host is gone");
    let err = stderr(&out);
    assert!(err.contains("lost") || err.contains("failed"), "{err}");
    assert_ne!(out.status.code(), None, "killed by the test's watchdog: it hung ({err})");
}

#[test]
fn bad_flags_are_explained() {
    let out = run_with_timeout(&["bench", "random", "--size", "12Q"], TIMEOUT);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown unit"), "{}", stderr(&out));
    let out = run_with_timeout(&["bench", "sort"], TIMEOUT);
    assert!(stderr(&out).contains("expected one of: seq-read"), "{}", stderr(&out));
    let out = run_with_timeout(&["bench", "random", "--size", "8M", "--local-mem", "200%"], TIMEOUT);
    assert!(stderr(&out).contains("(0, 100]"), "{}", stderr(&out));
    let out = run_with_timeout(&["bench", "stride", "--size", "8M", "--stride", "0"], TIMEOUT);
    assert!(stderr(&out).contains("--stride must be 1 to 2047"), "{}", stderr(&out));
    let out = run_with_timeout(&["bench", "list-walk", "--size", "8M", "--threads", "2"], TIMEOUT);
    assert!(stderr(&out).contains("list-walk runs on one thread"), "{}", stderr(&out));
    let out = run_with_timeout(&["host", "--capacity", "lots"], TIMEOUT);
    assert!(stderr(&out).contains("has no number"), "{}", stderr(&out));
    let out = run_with_timeout(&["host", "--capacity", "1G", "--busy-poll", "1s"], TIMEOUT);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at most 100ms"), "{}", stderr(&out));
}

/// Line write-back sends the changed lines plus a small header per page, far less than
/// whole pages; page mode sends whole pages; both verify.
#[test]
fn sparse_write_sends_lines_not_pages() {
    require_userfaultfd();
    let run = |mode: &str| {
        let out = run_with_timeout(
            // Enough operations that the fill's dense pages, written back early in the
            // measured phase, are a small part of the traffic.
            &[
                "bench",
                "sparse-write",
                "--size",
                "16M",
                "--local-mem",
                "25%",
                "--ops",
                "40000",
                "--writeback",
                mode,
                "--json",
            ],
            TIMEOUT,
        );
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        json(&out)
    };
    let line = run("line");
    assert_eq!(line["verified"], true, "{line}");
    let pages = line["dirty_pages_written"].as_f64().unwrap();
    let lines = line["dirty_lines_written"].as_f64().unwrap();
    let sent = line["bytes_written_back"].as_f64().unwrap();
    assert!(pages > 1000.0, "{line}");
    assert!(sent <= 1.25 * lines * 64.0 + 48.0 * pages, "{line}");
    assert!(line["page_granular_bytes"].as_f64().unwrap() > 10.0 * sent, "{line}");
    let page = run("page");
    assert_eq!(page["verified"], true, "{page}");
    assert_eq!(page["bytes_written_back"], page["page_granular_bytes"], "{page}");
}

/// Async dirty tracking (no write faults; written pages found by PAGEMAP_SCAN) verifies on
/// the write-heavy workloads, with whole-page write-back, and says what it did.
#[test]
fn async_dirty_tracking_verifies_with_no_write_faults() {
    require_userfaultfd();
    for workload in ["seq-write", "sparse-write", "quicksort"] {
        let out = run_with_timeout(
            &[
                "bench",
                workload,
                "--size",
                "16M",
                "--local-mem",
                "25%",
                "--dirty-tracking",
                "async",
                "--json",
            ],
            TIMEOUT,
        );
        assert!(out.status.success(), "{workload}: {}", stderr(&out));
        let r = json(&out);
        assert_eq!(r["verified"], true, "{workload}: {r}");
        assert_eq!(r["dirty_tracking"], "async", "{r}");
        assert_eq!(r["writeback"], "page", "{r}");
        assert_eq!(r["write_faults"], 0, "{workload}: {r}");
        assert!(r["tracking_scans"].as_u64().is_some_and(|n| n > 0), "{workload}: {r}");
        assert!(r["pages_written_back"].as_u64().is_some_and(|n| n > 0), "{workload}: {r}");
    }
    let out = run_with_timeout(
        &["bench", "random", "--size", "8M", "--dirty-tracking", "async", "--writeback", "line"],
        TIMEOUT,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--writeback page"), "{}", stderr(&out));
    let out = run_with_timeout(&["bench", "random", "--size", "8M", "--dirty-tracking", "lazy"], TIMEOUT);
    assert!(stderr(&out).contains("expected sync or async"), "{}", stderr(&out));
}

/// Without permission to use userfaultfd, the command says what to do instead of failing
/// obscurely. Runs the binary as `nobody` (needs root to drop privileges).
#[test]
fn no_userfaultfd_permission_is_explained() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root, to run clustermem as nobody");
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", common::bin()])
        .args(["bench", "random", "--size", "8M"])
        .output()
        .expect("setpriv (util-linux) runs");
    if unprivileged.trim() == "1" {
        // The machine allows unprivileged userfaultfd: then the run must simply work.
        assert!(out.status.success(), "{}", stderr(&out));
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("not permitted to use userfaultfd") && err.contains("/dev/userfaultfd"),
            "{err}"
        );
    }
}

/// The prefetcher follows a sequential scan (fewer faults than pages, data verified), also
/// two at once from two threads, and stays quiet on a random stream.
#[test]
fn prefetch_follows_scans_and_ignores_random_streams() {
    require_userfaultfd();
    let run_threads = |workload: &str, prefetch: &str, threads: &str| {
        let out = run_with_timeout(
            &[
                "bench",
                workload,
                "--size",
                "32M",
                "--local-mem",
                "25%",
                "--prefetch",
                prefetch,
                "--threads",
                threads,
                "--json",
            ],
            TIMEOUT,
        );
        assert!(out.status.success(), "{workload} {prefetch}: {}", stderr(&out));
        let r = json(&out);
        assert_eq!(r["verified"], true, "{r}");
        r
    };
    let run = |workload: &str, prefetch: &str| run_threads(workload, prefetch, "1");
    let scan = run("seq-read", "auto");
    let pages = 8192;
    assert!(scan["prefetch_issued"].as_u64().unwrap() > pages / 4, "{scan}");
    assert!(scan["remote_faults"].as_u64().unwrap() < pages / 2, "{scan}");
    // Each thread reads its own part in order: their misses interleave, each thread's
    // stream still has its trend.
    let scans = run_threads("seq-read", "auto", "2");
    assert!(scans["remote_faults"].as_u64().unwrap() < pages / 2, "{scans}");
    let off = run("seq-read", "off");
    assert_eq!(off["prefetch_issued"], 0, "{off}");
    // Without prefetch nearly every page faults (a few may still be resident from the fill).
    assert!(off["remote_faults"].as_u64().unwrap() > pages * 9 / 10, "{off}");
    let random = run("random", "auto");
    assert_eq!(random["prefetch_issued"], 0, "{random}");
    // Pointer mode finds no addresses in random data: nothing issued.
    let random = run("random", "pointer");
    assert_eq!(random["prefetch_issued"], 0, "{random}");
}

/// Pointer prefetch follows a linked list scattered over the region: the walk sends far fewer
/// fetches of its own than without it, and blocks (fetching or waiting for a page in flight)
/// at most half as often, its host following the chain.
#[test]
fn pointer_prefetch_follows_a_list_walk() {
    require_userfaultfd();
    let run = |prefetch: &str| {
        let out = run_with_timeout(
            &["bench", "list-walk", "--size", "16M", "--local-mem", "25%", "--prefetch", prefetch, "--json"],
            TIMEOUT,
        );
        assert!(out.status.success(), "{prefetch}: {}", stderr(&out));
        let r = json(&out);
        assert_eq!(r["verified"], true, "{r}");
        r
    };
    let off = run("off");
    let auto = run("auto");
    let pointer = run("pointer");
    let faults = |r: &serde_json::Value| r["remote_faults"].as_u64().unwrap();
    assert_eq!(auto["prefetch_issued"], 0, "a scattered list has no stride: {auto}");
    assert!(pointer["pointer_prefetch_issued"].as_u64().unwrap() > faults(&off) / 2, "{pointer}");
    assert!(faults(&pointer) * 2 < faults(&off), "off: {off}\npointer: {pointer}");
    let blocking = faults(&pointer) + pointer["prefetch_waits"].as_u64().unwrap();
    assert!(blocking * 2 < faults(&off), "off: {off}\npointer: {pointer}");
    assert!(pointer["pointer_chains_offloaded"].as_u64().unwrap() > 0, "{pointer}");
}

/// A host that stops answering (SIGSTOP: its connections stay open) is declared dead after
/// the request timeout: the run fails with a message instead of hanging.
#[test]
fn silent_host_times_out_instead_of_hanging() {
    require_userfaultfd();
    let out = fail_host_mid_run(|host| host.signal(libc::SIGSTOP));
    let err = stderr(&out);
    assert!(!out.status.success(), "the run must fail once its host stops answering: {err}");
    assert_ne!(out.status.code(), None, "killed by the test's watchdog: it hung ({err})");
    assert!(err.contains("did not answer"), "{err}");
}
