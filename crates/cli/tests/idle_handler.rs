//! The fault handler sleeps when there is nothing to do. In a test binary of its own: the
//! measure is the CPU time of the process's one `uffd-handler` thread, and tests running in
//! parallel in one process would each have their own (one in `data_path` once measured
//! another test's busy handler).

mod common;

use std::time::Duration;

use clustermem_runtime::{Runtime, RuntimeConfig};
use common::{pattern, require_userfaultfd, stat_fields, HostProcess};

/// The CPU time, in clock ticks, this process's fault handler thread has used (the only one:
/// this binary's single test starts the only runtime).
fn handler_cpu_ticks() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "uffd-handler" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).expect("the handler's stat");
        // From the state (field 3) on: utime is field 14, stime 15.
        let fields = stat_fields(&stat);
        return fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    }
    panic!("no uffd-handler thread in this process");
}

/// A dead host is redialed every second by a thread that wakes the handler with its result.
/// The handler must sleep again after: its wake-up was once left set, so every later `poll`
/// returned at once and the handler spun at full CPU for good, on its faulting thread's CPU,
/// holding that thread off for a time slice per fault (killed-host runs took 2-3x as long).
#[test]
fn the_handler_sleeps_while_a_dead_host_is_redialed() {
    require_userfaultfd();
    let a = HostProcess::start("64M");
    let mut b = HostProcess::start("64M");
    let rt = Runtime::start(RuntimeConfig {
        hosts: vec![a.addr.clone(), b.addr.clone()],
        local_mem_bytes: 1 << 20,
        slab_bytes: 1 << 20,
        redundancy: clustermem_runtime::Redundancy::Replicate(2),
        ..RuntimeConfig::default()
    })
    .expect("starting the runtime");
    let mut region = rt.map(4 << 20).unwrap();
    for (i, byte) in region.as_mut_slice().iter_mut().enumerate() {
        *byte = pattern(i);
    }
    b.kill9();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rt.stats().snapshot().hosts_lost == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rt.stats().snapshot().hosts_lost, 1, "the killed host is found dead");
    // Two redials (one a second) have woken the handler by now.
    std::thread::sleep(Duration::from_millis(2500));
    let (before, started) = (handler_cpu_ticks(), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let ticks = handler_cpu_ticks() - before;
    let per_s = ticks as f64 / started.elapsed().as_secs_f64();
    // Asleep, it uses next to nothing (a redial a second); spinning, ~100 ticks a second.
    assert!(per_s < 10.0, "the idle handler used {ticks} clock ticks in 2 s: it does not sleep");
    // And the region still reads back from the surviving copy.
    for (i, &byte) in region.as_slice().iter().enumerate() {
        assert_eq!(byte, pattern(i), "byte {i}");
    }
}
