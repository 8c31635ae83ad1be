//! Cost per written page of the two ways to find written pages, measured in one run:
//! - sync: pages write-protected with UFFDIO_WRITEPROTECT; the first store to each page faults,
//!   a handler thread unprotects it (what clustermem's runtime does: exact, can hold a writer);
//! - async: UFFD_FEATURE_WP_ASYNC; the kernel resolves the fault itself, and one PAGEMAP_SCAN
//!   with PM_SCAN_WP_MATCHING finds the written pages and re-protects them.
//!
//! `sudo cargo run --release -p clustermem-uffd --example tracking_cost [PAGES]` prints JSON.
use std::time::Instant;

use clustermem_uffd::{Event, Features, PagemapScanner, RegisterMode, Uffd, PAGE_SIZE};

fn populated(pages: usize) -> usize {
    // SAFETY: a fresh private anonymous mapping, populated for writing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p as usize
}

fn touch_all(base: usize, pages: usize) {
    for i in 0..pages {
        // SAFETY: inside the mapping made by `populated`.
        unsafe { std::ptr::write_volatile((base + i * PAGE_SIZE) as *mut u8, 1) };
    }
}

fn sync_ns_per_page(pages: usize) -> f64 {
    let uffd = std::sync::Arc::new(Uffd::open(Features::PAGEFAULT_FLAG_WP).expect("userfaultfd"));
    let base = populated(pages);
    // SAFETY: our mapping; the thread below serves its write-protect faults.
    unsafe { uffd.register(base, pages * PAGE_SIZE, RegisterMode { missing: false, write_protect: true }) }
        .expect("register");
    uffd.write_protect(base, pages * PAGE_SIZE, true, true).expect("protect");
    let handler_uffd = std::sync::Arc::clone(&uffd);
    let handler = std::thread::spawn(move || {
        let mut served = 0;
        let mut events = [Event::Other(0); 64];
        while served < pages {
            let n = handler_uffd.read_events(&mut events).expect("read");
            for ev in &events[..n] {
                if let Event::PageFault { addr, .. } = *ev {
                    handler_uffd.write_protect(addr, PAGE_SIZE, false, true).expect("unprotect");
                    served += 1;
                }
            }
            if n == 0 {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*handler_uffd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
        }
    });
    let t = Instant::now();
    touch_all(base, pages);
    let ns = t.elapsed().as_nanos() as f64 / pages as f64;
    handler.join().expect("handler");
    ns
}

fn async_ns_per_page(pages: usize) -> Option<(f64, f64)> {
    let uffd = Uffd::open(Features::PAGEFAULT_FLAG_WP.union(Features::WP_ASYNC)).ok()?;
    let base = populated(pages);
    // SAFETY: our mapping; with WP_ASYNC the kernel resolves its write-protect faults.
    unsafe { uffd.register(base, pages * PAGE_SIZE, RegisterMode { missing: false, write_protect: true }) }
        .expect("register");
    uffd.write_protect(base, pages * PAGE_SIZE, true, true).expect("protect");
    let mut scanner = PagemapScanner::open().expect("pagemap");
    let t = Instant::now();
    touch_all(base, pages);
    let write_ns = t.elapsed().as_nanos() as f64 / pages as f64;
    let t = Instant::now();
    let mut found = 0;
    scanner
        .scan_written(base, base + pages * PAGE_SIZE, true, |s, e| found += (e - s) / PAGE_SIZE)
        .expect("scan");
    let scan_ns = t.elapsed().as_nanos() as f64 / pages as f64;
    assert_eq!(found, pages, "every written page is found");
    Some((write_ns, scan_ns))
}

fn main() {
    let pages: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(65_536);
    let sync = sync_ns_per_page(pages);
    match async_ns_per_page(pages) {
        Some((write, scan)) => println!(
            "{{\"pages\": {pages}, \"sync_wp_fault_ns_per_page\": {sync:.0}, \"async_write_ns_per_page\": {write:.0}, \"async_scan_ns_per_page\": {scan:.0}, \"async_total_ns_per_page\": {:.0}}}",
            write + scan
        ),
        None => println!("{{\"pages\": {pages}, \"sync_wp_fault_ns_per_page\": {sync:.0}, \"async\": \"UFFD_FEATURE_WP_ASYNC unavailable (Linux 6.7+)\"}}"),
    }
}
