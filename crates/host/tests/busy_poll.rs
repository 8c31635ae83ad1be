//! A connection busy-polls while its client is busy (`MemoryHost::with_busy_poll`): a client
//! that sends a request every ~300 us finds the connection thread awake; once the client
//! pauses, the thread sleeps and takes no CPU; with the window off it sleeps between
//! requests. Counted by the thread's voluntary context switches (sleeps; a yield is not one)
//! and its CPU time (`/proc/self/task/N/schedstat`). Its own test binary: the one connection
//! thread of the process is the one measured.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clustermem_host::MemoryHost;
use common::Client;

const REQUESTS: u64 = 300;

/// The `/proc` folder of this process's one connection thread ("host-conn-..."), if any.
fn connection_thread() -> Option<PathBuf> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    let mut found: Vec<PathBuf> = tasks
        .flatten()
        .map(|t| t.path())
        .filter(|t| std::fs::read_to_string(t.join("comm")).unwrap_or_default().starts_with("host-conn"))
        .collect();
    assert!(found.len() <= 1, "one connection thread at a time: {found:?}");
    found.pop()
}

/// How often the thread slept (voluntary context switches), and its CPU time.
fn sleeps_and_cpu(thread: &Path) -> (u64, Duration) {
    let status = std::fs::read_to_string(thread.join("status")).expect("status");
    let sleeps = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).expect("field");
    let schedstat = std::fs::read_to_string(thread.join("schedstat")).expect("schedstat");
    let on_cpu_ns = schedstat.split_whitespace().next().expect("first field");
    (sleeps.trim().parse().expect("a number"), Duration::from_nanos(on_cpu_ns.parse().expect("a number")))
}

/// Sends `REQUESTS` requests ~300 us apart through a new connection to a host with `window`,
/// then pauses. Returns how often its connection thread slept during the requests, and its
/// CPU time during 200 ms of the pause.
fn serve_with(window: Duration) -> (u64, Duration) {
    let host = MemoryHost::bind("127.0.0.1:0", 1 << 20).expect("bind").with_busy_poll(window).spawn();
    let mut client = Client::connect(&host);
    client.stats();
    let thread = connection_thread().expect("the connection's thread");
    let (before, _) = sleeps_and_cpu(&thread);
    for _ in 0..REQUESTS {
        std::thread::sleep(Duration::from_micros(300));
        client.stats();
    }
    let (after, _) = sleeps_and_cpu(&thread);
    // Past the window the client is idle: the thread must sleep, not poll on.
    std::thread::sleep(window + Duration::from_millis(20));
    let (_, idle_from) = sleeps_and_cpu(&thread);
    std::thread::sleep(Duration::from_millis(200));
    let (_, idle_to) = sleeps_and_cpu(&thread);
    drop(client);
    drop(host);
    // `drop(host)` joined the thread; `/proc` may list it a moment longer.
    let started = Instant::now();
    while connection_thread().is_some() {
        assert!(started.elapsed() < Duration::from_secs(5), "the connection thread did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    (after - before, idle_to - idle_from)
}

#[test]
fn a_busy_clients_connection_stays_awake_and_sleeps_once_it_pauses() {
    // A window well over the requests' spacing, so that a loaded machine's late wake-ups of
    // this client do not make it look idle: the test is about the mechanism.
    let (busy, busy_idle_cpu) = serve_with(Duration::from_millis(10));
    let (off, off_idle_cpu) = serve_with(Duration::ZERO);
    eprintln!(
        "connection thread over {REQUESTS} requests ~300 us apart: {busy} sleeps busy-polling, {off} without; \
         CPU in 200 ms of the client's pause: {busy_idle_cpu:?} and {off_idle_cpu:?}"
    );
    assert!(busy < REQUESTS / 4, "busy-polling, the thread slept {busy} times in {REQUESTS} requests");
    assert!(
        off > REQUESTS * 3 / 4,
        "without the window, the thread slept only {off} times in {REQUESTS} requests"
    );
    assert!(
        busy_idle_cpu < Duration::from_millis(20),
        "an idle client's connection took {busy_idle_cpu:?} of CPU"
    );
}
