//! The runtime against real memory-host processes: data survives eviction byte for byte,
//! pages spread over several hosts, and failures are reported, not hung on.

mod common;

use std::time::Duration;

use clustermem_runtime::{DirtyTracking, Runtime, RuntimeConfig, RuntimeError, WritebackMode, PAGE_SIZE};
use common::{pattern, require_userfaultfd, HostProcess};

fn runtime(hosts: &[&HostProcess], local_mem: u64) -> Runtime {
    Runtime::start(RuntimeConfig {
        hosts: hosts.iter().map(|h| h.addr.clone()).collect(),
        local_mem_bytes: local_mem,
        slab_bytes: 1 << 20,
        request_timeout: Duration::from_secs(3),
        ..RuntimeConfig::default()
    })
    .expect("starting the runtime")
}

/// A region 16x the local limit, spread over two host processes, written and read back
/// byte for byte; then overwritten sparsely and read back again.
#[test]
fn region_larger_than_local_memory_round_trips_through_two_hosts() {
    require_userfaultfd();
    let a = HostProcess::start("64M");
    let b = HostProcess::start("64M");
    let rt = runtime(&[&a, &b], 2 << 20);
    let mut region = rt.map(32 << 20).unwrap();
    let bytes = region.as_mut_slice();
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = pattern(i);
    }
    for (i, &byte) in region.as_slice().iter().enumerate() {
        assert_eq!(byte, pattern(i), "byte {i}");
    }
    // Sparse overwrite: one byte in every seventh page.
    let bytes = region.as_mut_slice();
    for page in (0..bytes.len() / PAGE_SIZE).step_by(7) {
        bytes[page * PAGE_SIZE + 100] ^= 0xFF;
    }
    for (i, &byte) in region.as_slice().iter().enumerate() {
        let flipped = (i / PAGE_SIZE).is_multiple_of(7) && i % PAGE_SIZE == 100;
        assert_eq!(byte, if flipped { !pattern(i) } else { pattern(i) }, "byte {i} after overwrite");
    }
    let stats = rt.stats().snapshot();
    assert!(stats.pages_evicted > 3 * 8192 / 2, "evictions: {stats:?}");
    assert!(stats.pages_fetched > 8192, "fetches: {stats:?}");
    assert!(stats.pages_written_back > 8192, "write-backs: {stats:?}");
}

/// Never-written pages read as zeros without a network trip.
#[test]
fn untouched_pages_read_as_zero_locally() {
    require_userfaultfd();
    let a = HostProcess::start("64M");
    let rt = runtime(&[&a], 1 << 20);
    let region = rt.map(8 << 20).unwrap();
    assert!(region.as_slice().iter().all(|&b| b == 0));
    let stats = rt.stats().snapshot();
    assert_eq!(stats.pages_fetched, 0);
    assert_eq!(stats.zero_faults, 2048);
}

/// A program writing several runs of fresh memory in order, interleaved (an allocator
/// carving one extent per size class), gets them filled with zeros 16 pages a fault, each
/// run followed on its own: 129 faults for these 2048 pages. With one run remembered, each
/// broke the other's every few pages: 243.
#[test]
fn interleaved_writers_of_fresh_memory_take_few_faults() {
    require_userfaultfd();
    let a = HostProcess::start("64M");
    let rt = runtime(&[&a], 64 << 20);
    let mut region = rt.map(8 << 20).unwrap();
    let bytes = region.as_mut_slice();
    let half = bytes.len() / 2;
    for page in 0..half / 4096 {
        // Volatile: in this order, one page of each run after the other.
        // SAFETY: both addresses lie in the region's slice.
        unsafe {
            std::ptr::write_volatile(&mut bytes[page * 4096], 1);
            std::ptr::write_volatile(&mut bytes[half + page * 4096], 2);
        }
    }
    let stats = rt.stats().snapshot();
    assert!(stats.zero_faults < 160, "{stats:?}");
    assert!((0..half / 4096).all(|p| bytes[p * 4096] == 1 && bytes[half + p * 4096] == 2));
}

/// Threads writing disjoint words concurrently, with eviction running, lose nothing.
#[test]
fn concurrent_writers_under_eviction_lose_nothing() {
    require_userfaultfd();
    let a = HostProcess::start("64M");
    let rt = runtime(&[&a], 1 << 20);
    let region = rt.map(8 << 20).unwrap();
    let words = region.as_atomic_u64s();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for round in 0..3u64 {
                    for i in (t as usize..words.len()).step_by(4 * 61) {
                        words[i].fetch_add(round + 1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    region.flush().unwrap();
    for (i, w) in words.iter().enumerate() {
        let expected = if i % (4 * 61) < 4 { 6 } else { 0 };
        assert_eq!(w.load(std::sync::atomic::Ordering::Relaxed), expected, "word {i}");
    }
}

/// Async tracking takes no twins, so asking it for line write-back is refused, saying why.
#[test]
fn async_tracking_with_line_write_back_is_refused() {
    require_userfaultfd();
    let err = Runtime::start(RuntimeConfig {
        dirty_tracking: DirtyTracking::Async,
        writeback: WritebackMode::Line,
        ..RuntimeConfig::default()
    })
    .expect_err("line write-back needs twins");
    assert!(err.to_string().contains("--writeback page"), "{err}");
}

/// A region larger than the host's capacity is refused with the host's reason.
#[test]
fn full_host_refuses_with_a_clear_error() {
    require_userfaultfd();
    let a = HostProcess::start("4M");
    let rt = runtime(&[&a], 1 << 20);
    match rt.map(16 << 20) {
        Err(RuntimeError::HostRefused { message, .. }) => {
            assert!(message.contains("host is full"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The host still serves what fits.
    let mut region = rt.map(2 << 20).unwrap();
    region.as_mut_slice()[5] = 5;
    assert_eq!(region.as_slice()[5], 5);
}

/// An unreachable host is named in the error.
#[test]
fn unreachable_host_is_a_clear_error() {
    require_userfaultfd();
    let err = Runtime::start(RuntimeConfig { hosts: vec!["127.0.0.1:1".into()], ..RuntimeConfig::default() })
        .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1") && text.contains("unreachable"), "{text}");
}

/// Flush returns only once the host holds the data: a second runtime... cannot read another's
/// slabs, so instead check that after flush and a host kill, nothing resident is lost and the
/// region reports the loss of what was only on the host.
#[test]
fn dead_host_is_reported_not_hung_on() {
    require_userfaultfd();
    let mut a = HostProcess::start("64M");
    let rt = runtime(&[&a], 1 << 20);
    let mut region = rt.map(8 << 20).unwrap();
    region.as_mut_slice().fill(7); // most pages now live only on the host
    a.kill9();
    // Touch a page that was evicted long ago from a thread we can abandon: it must get
    // SIGBUS (poisoned) or the region must report the loss; it must never read a zero.
    let flush = region.flush();
    assert!(flush.is_err(), "flush to a dead host must fail, got {flush:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while region.error().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let error = region.error().expect("the region reports the lost pages");
    assert!(error.contains("lost"), "{error}");
}

/// Writers on several threads, the flusher running every few milliseconds and eviction under
/// a tight limit (1/4 of the region): pages are re-dirtied during their own write-back all the
/// time. Every word is then checked against a shadow copy; reading them back fetches most
/// pages from the host again.
#[test]
fn redirtied_pages_survive_concurrent_flushes_and_evictions() {
    redirtied_pages_survive(DirtyTracking::Sync, WritebackMode::Line, 1 << 20, 4);
}

/// One writer: the handler follows it onto its CPU and defers each install's bookkeeping
/// (twin, dirty list, policy) until the next fault's request is out, while the flusher runs
/// every 2 ms and pages are evicted and fetched again all the time. A flush of a page whose
/// install is still pending (dirty, on the dirty list from before its eviction, no twin yet)
/// would send the wrong lines or leave a stale twin: every word is checked.
#[test]
fn one_writer_on_the_handlers_cpu_keeps_every_store() {
    let stats = redirtied_pages_survive(DirtyTracking::Sync, WritebackMode::Line, 1 << 20, 1);
    assert!(stats.deferred_installs > 1000, "installs were deferred: {stats:?}");
}

/// One writer on an erasure-coded region (2+1 over three hosts), whose write-backs need the
/// twin of every dirty page (parity is updated from the changed lines), with installs
/// deferring their bookkeeping (twins copied from the reply later), the flusher running
/// every 2 ms and pages evicted and fetched again all the time: nothing is reported lost
/// and every word reads back.
#[test]
fn one_writer_on_an_erasure_coded_region_keeps_every_store_with_deferred_installs() {
    use std::sync::atomic::Ordering::Relaxed;
    require_userfaultfd();
    let hosts: Vec<HostProcess> = (0..3).map(|_| HostProcess::start("64M")).collect();
    let rt = Runtime::start(RuntimeConfig {
        hosts: hosts.iter().map(|h| h.addr.clone()).collect(),
        local_mem_bytes: 1 << 20,
        slab_bytes: 1 << 20,
        flush_interval: Some(Duration::from_millis(2)),
        redundancy: "erasure:2+1".parse().unwrap(),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let region = rt.map(4 << 20).unwrap();
    let words = region.as_atomic_u64s();
    let mut shadow = vec![0u64; words.len()];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x >> 8) as usize % words.len();
        words[i].store(x, Relaxed);
        shadow[i] = x;
    }
    region.flush().unwrap();
    assert_eq!(region.error(), None, "no page was lost");
    for (i, (w, s)) in words.iter().zip(&shadow).enumerate() {
        assert_eq!(w.load(Relaxed), *s, "word {i}");
    }
    let stats = rt.stats().snapshot();
    assert!(stats.deferred_installs > 1000, "installs were deferred: {stats:?}");
}

/// The same under async tracking, where stores never wait for the handler: a store racing
/// an eviction's scan, its move or a flusher's copy must not be lost. (This test found the
/// kernel reporting `EEXIST` for a move it had made: see `Uffd::move_pages`.)
#[test]
fn redirtied_pages_survive_under_async_tracking() {
    redirtied_pages_survive(DirtyTracking::Async, WritebackMode::Page, 1 << 20, 4);
}

/// Async tracking with local memory large enough for a ring of recent victims (1 MiB of the
/// 16): many stores land on pages moved back from it, and pages leave again after such a
/// store. Every word must still read back right: a page moved back from the wrong slot, or
/// from a slot whose page has changed since, fails this (checked by moving from a
/// neighbouring slot: word 19480 wrong).
#[test]
fn pages_moved_back_from_the_ring_of_recent_victims_keep_their_stores() {
    let stats = redirtied_pages_survive(DirtyTracking::Async, WritebackMode::Page, 16 << 20, 4);
    assert!(stats.rescued_faults > 100, "pages came back from the ring: {stats:?}");
}

/// Async tracking with a ring of recent victims, under what an allocator does: words
/// written and read back at random, runs of pages discarded (freed: they read as zeros
/// after) and rewritten, and sequential sweeps that start the prefetcher, whose windows
/// cover pages in the ring. Each read is checked against a shadow as it happens: a page
/// moved back stale, or one that missed its discard, fails at once.
#[test]
fn discarded_and_moved_back_pages_read_what_was_last_written() {
    use std::sync::atomic::Ordering::Relaxed;
    require_userfaultfd();
    let a = HostProcess::start("128M");
    let rt = Runtime::start(RuntimeConfig {
        hosts: vec![a.addr.clone()],
        local_mem_bytes: 16 << 20,
        slab_bytes: 1 << 20,
        dirty_tracking: DirtyTracking::Async,
        writeback: WritebackMode::Page,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let region = rt.map(64 << 20).unwrap();
    let words = region.as_atomic_u64s();
    let pages = region.len() / 4096;
    let per_page = 4096 / 8;
    let mut shadow = vec![0u64; words.len()];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300_000u64 {
        let r = next();
        match r % 100 {
            0 => {
                // Free a run of pages, as an allocator gives memory back.
                let (first, n) = (r as usize / 100 % pages, 1 + (r >> 40) as usize % 32);
                let n = n.min(pages - first);
                region.discard(first * 4096, n * 4096).unwrap();
                shadow[first * per_page..(first + n) * per_page].fill(0);
            }
            1 => {
                // A sequential sweep (reads) over 64 pages: the prefetcher follows it.
                let first = r as usize / 100 % (pages - 64);
                for p in first..first + 64 {
                    let i = p * per_page + (round as usize % per_page);
                    assert_eq!(
                        words[i].load(Relaxed),
                        shadow[i],
                        "word {i} (page {p}) in a sweep, round {round}"
                    );
                }
            }
            _ => {
                // A working set sliding through the region, a little larger than local
                // memory: pages evicted moments ago come back.
                let page = (round as usize / 16 + pages - (r >> 8) as usize % 4500) % pages;
                let i = page * per_page + (r >> 24) as usize % per_page;
                assert_eq!(
                    words[i].load(Relaxed),
                    shadow[i],
                    "word {i} (page {}), round {round}",
                    i / per_page
                );
                if r & 1 == 0 {
                    words[i].store(r, Relaxed);
                    shadow[i] = r;
                }
            }
        }
    }
    for (i, (w, s)) in words.iter().zip(&shadow).enumerate() {
        assert_eq!(w.load(Relaxed), *s, "word {i} at the end");
    }
    let stats = rt.stats().snapshot();
    assert!(stats.rescued_faults > 100 && stats.pages_evicted > 10_000, "{stats:?}");
}

/// Returns the runtime's figures once every word has been checked.
fn redirtied_pages_survive(
    dirty_tracking: DirtyTracking,
    writeback: WritebackMode,
    local_mem_bytes: u64,
    threads: usize,
) -> clustermem_runtime::StatsSnapshot {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    require_userfaultfd();
    let a = HostProcess::start("128M");
    // A writer stuck on a page the runtime cannot serve would hang the test (and CI) for
    // good: it takes ~2 s, so if it is not over in 120 s the process stops with the reason,
    // and the host process with it. (`_done`, declared before the runtime, is dropped after
    // it, so its teardown is watched too; that ends the watchdog.)
    let (_done, over) = std::sync::mpsc::channel::<()>();
    let host_pid = a.child.id();
    std::thread::spawn(move || {
        if over.recv_timeout(Duration::from_secs(120)) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("redirtied_pages_survive: writers stuck for 120 s (a page the runtime cannot serve)");
            // SAFETY: kill(2) on the host process this test started.
            unsafe { libc::kill(host_pid as libc::pid_t, libc::SIGKILL) };
            std::process::exit(101);
        }
    });
    let rt = Runtime::start(RuntimeConfig {
        hosts: vec![a.addr.clone()],
        local_mem_bytes,
        slab_bytes: 1 << 20,
        flush_interval: Some(Duration::from_millis(2)),
        dirty_tracking,
        writeback,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let region = rt.map(4 * local_mem_bytes as usize).unwrap();
    let words = region.as_atomic_u64s();
    let shadow: Vec<AtomicU64> = (0..words.len()).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let shadow = &shadow;
            s.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
                for _ in 0..160_000 / threads {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Each thread owns the words i with i % threads == t; sparse stores, a few
                    // per line, so line write-back and re-dirtying interleave.
                    let i = ((x >> 8) as usize % (words.len() / threads)) * threads + t;
                    words[i].store(x, Relaxed);
                    shadow[i].store(x, Relaxed);
                }
            });
        }
    });
    region.flush().unwrap();
    let stats = rt.stats().snapshot();
    assert!(stats.pages_flushed > 0, "the flusher ran: {stats:?}");
    assert!(stats.pages_evicted > 1000, "eviction ran: {stats:?}");
    match dirty_tracking {
        DirtyTracking::Sync => {
            assert!(
                stats.dirty_lines_written < stats.pages_written_back * 64,
                "line write-back was used: {stats:?}"
            );
        }
        DirtyTracking::Async => {
            assert_eq!(stats.write_faults, 0, "no store waited for the handler: {stats:?}");
            assert!(stats.tracking_scans > 0, "written pages were found by scans: {stats:?}");
        }
    }
    for (i, (w, s)) in words.iter().zip(&shadow).enumerate() {
        assert_eq!(w.load(Relaxed), s.load(Relaxed), "word {i}");
    }
    rt.stats().snapshot()
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kb * 1024
}

/// A reserved region takes host memory only where committed; a discarded range reads as zeros
/// (also after its pages went to the host and came back) and the host gives its memory back.
#[test]
fn reserved_regions_commit_on_demand_and_discard_frees_host_memory() {
    require_userfaultfd();
    let a = HostProcess::start("8M");
    let rt = runtime(&[&a], 256 << 10);
    // 64 MiB of address space on an 8 MiB host: fine while uncommitted.
    let mut region = rt.reserve(64 << 20).unwrap();
    match region.commit(0, 16 << 20) {
        Err(RuntimeError::HostRefused { message, .. }) => {
            assert!(message.contains("host is full"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (offset, len) = (32 << 20, 4 << 20);
    region.commit(offset, len).unwrap();
    region.commit(offset, len).expect("commit is idempotent");
    let host_rss_before = rss_bytes(a.child.id());
    let bytes = &mut region.as_mut_slice()[offset..offset + len];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = pattern(i) | 1;
    }
    region.flush().unwrap();
    for (i, &b) in region.as_slice()[offset..offset + len].iter().enumerate().step_by(4093) {
        assert_eq!(b, pattern(i) | 1, "byte {i} before discard");
    }
    // Most pages were evicted (256 KiB local): they live on the host now. Measured after all
    // the traffic, so the host's connection buffers have reached their size.
    let host_rss_written = rss_bytes(a.child.id());
    assert!(host_rss_written >= host_rss_before + (3 << 20), "{host_rss_before} -> {host_rss_written}");
    region.discard(offset + PAGE_SIZE, len - 2 * PAGE_SIZE).unwrap();
    let data = &region.as_slice()[offset..offset + len];
    assert!(data[..PAGE_SIZE].iter().enumerate().all(|(i, &b)| b == pattern(i) | 1), "first page kept");
    assert!(data[PAGE_SIZE..len - PAGE_SIZE].iter().all(|&b| b == 0), "discarded pages read as zeros");
    let tail = len - PAGE_SIZE;
    assert!(data[tail..].iter().enumerate().all(|(i, &b)| b == pattern(tail + i) | 1), "last page kept");
    region.flush().unwrap(); // a barrier: the host has applied the discard
    let host_rss_after = rss_bytes(a.child.id());
    assert!(host_rss_after + (3 << 20) <= host_rss_written, "{host_rss_written} -> {host_rss_after}");
    assert!(region.discard(1, PAGE_SIZE).is_err(), "unaligned ranges are refused");
    assert!(region.commit(64 << 20, PAGE_SIZE).is_err(), "ranges past the end are refused");
}

/// Whether the page at `addr` is mapped in this process.
fn resident(addr: usize) -> bool {
    let mut vec = 0u8;
    // SAFETY: mincore(2) reads the page tables for one page-aligned page and writes one byte.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE_SIZE, &mut vec) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec & 1 != 0
}

/// A read still in flight when its page is discarded never lands: the page may be rewritten,
/// written back and fetched anew before the old reply arrives. A stopped host holds every
/// reply back until all of that has happened, then answers in order: the stale page first.
#[test]
fn a_read_in_flight_across_a_discard_never_lands() {
    require_userfaultfd();
    let mut host = HostProcess::start("16M");
    let rt = runtime(&[&host], 4 * PAGE_SIZE as u64);
    let mut region = rt.map(256 * PAGE_SIZE).unwrap();
    let base = region.as_ptr() as usize;
    // Writes `byte` over page 0, then other pages until page 0 is evicted (written back).
    let mut next = 1;
    let mut write_and_push_out = |region: &mut clustermem_runtime::Region<'_>, byte: u8| {
        region.as_mut_slice()[..PAGE_SIZE].fill(byte);
        while resident(base) {
            assert!(next < 256, "page 0 was never evicted");
            region.as_mut_slice()[next * PAGE_SIZE..(next + 1) * PAGE_SIZE].fill(0x44);
            next += 1;
        }
    };
    write_and_push_out(&mut region, 0x11);
    region.flush().unwrap();
    host.stop();
    let read_first_byte = move || {
        // SAFETY: the region stays mapped until the end of the test, after both readers are
        // joined; a volatile load of one byte, which the runtime serves like any access.
        unsafe { std::ptr::read_volatile(base as *const u8) }
    };
    let stale = std::thread::spawn(read_first_byte); // its fetch waits at the stopped host
    std::thread::sleep(Duration::from_millis(200));
    region.discard(0, PAGE_SIZE).unwrap();
    assert_eq!(stale.join().unwrap(), 0, "woken by the discard, the reader refaults on zeros");
    // Rewritten, pushed out and faulted again, all while the host sleeps; the other pages
    // are dropped first, so that nothing evicts page 0 again once a reply installs it.
    write_and_push_out(&mut region, 0x22);
    region.discard(PAGE_SIZE, 255 * PAGE_SIZE).unwrap();
    let fresh = std::thread::spawn(read_first_byte);
    std::thread::sleep(Duration::from_millis(200));
    let before = rt.stats().snapshot().remote_faults;
    host.signal(libc::SIGCONT);
    assert_eq!(fresh.join().unwrap(), 0x22, "the reply to the read before the discard was installed");
    assert!(region.as_slice()[..PAGE_SIZE].iter().all(|&b| b == 0x22));
    // One fetch served a fault (the fresh one); the stale reply was dropped uncounted.
    assert_eq!(rt.stats().snapshot().remote_faults, before + 1);
}
