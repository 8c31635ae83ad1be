//! A connection busy-polls while its client is busy (`MemoryHost::with_busy_poll`): a client
//! that sends a request every ~300 us finds the connection thread awake, and with the window
//! off the thread sleeps between requests. Counted by the thread's voluntary context
//! switches (sleeps; a yield is not one). Its own test binary: the one connection thread of
//! the process is the one measured.

mod common;

use std::time::Duration;

use clustermem_host::MemoryHost;
use common::Client;

const REQUESTS: u64 = 300;

/// The voluntary context switches of this process's connection thread ("host-conn-...").
fn connection_thread_sleeps() -> u64 {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("host-conn") {
            let status = std::fs::read_to_string(task.path().join("status")).expect("status");
            let n = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).expect("field");
            found.push(n.trim().parse::<u64>().expect("a number"));
        }
    }
    assert_eq!(found.len(), 1, "exactly one connection thread");
    found[0]
}

/// Sends `REQUESTS` requests ~300 us apart through a new connection to a host with `window`;
/// returns how often its connection thread slept meanwhile.
fn sleeps_with(window: Duration) -> u64 {
    let host = MemoryHost::bind("127.0.0.1:0", 1 << 20).expect("bind").with_busy_poll(window).spawn();
    let mut client = Client::connect(&host);
    client.stats();
    let before = connection_thread_sleeps();
    for _ in 0..REQUESTS {
        std::thread::sleep(Duration::from_micros(300));
        client.stats();
    }
    let slept = connection_thread_sleeps() - before;
    drop(client);
    drop(host);
    slept
}

#[test]
fn a_busy_clients_connection_stays_awake_and_sleeps_without_the_window() {
    let busy = sleeps_with(Duration::from_millis(1));
    // Wait for that connection's thread to end before the next is counted.
    let started = std::time::Instant::now();
    while std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().starts_with("host-conn"))
    {
        assert!(started.elapsed() < Duration::from_secs(5), "the connection thread did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    let off = sleeps_with(Duration::ZERO);
    eprintln!(
        "connection thread sleeps over {REQUESTS} requests ~300 us apart: {busy} busy-polling, {off} without"
    );
    assert!(busy < REQUESTS / 4, "busy-polling, the thread slept {busy} times in {REQUESTS} requests");
    assert!(
        off > REQUESTS * 3 / 4,
        "without the window, the thread slept only {off} times in {REQUESTS} requests"
    );
}
