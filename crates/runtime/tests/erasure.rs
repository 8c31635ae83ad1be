//! Erasure-coded regions against six real hosts on loopback: sparse writes keep every
//! stripe's parity exact (the XORed changes), discards of whole stripe rows and of parts of
//! rows leave zeros that parity agrees with, and with two hosts stopped every page still
//! reads back right, decoded from the survivors.

use clustermem_host::{MemoryHost, RunningHost};
use clustermem_runtime::{PrefetchMode, Redundancy, Runtime, RuntimeConfig, PAGE_SIZE};

/// Pages of the region: 32 rows of 4 chunks of 16 pages.
const PAGES: usize = 2048;

fn fill(page: usize, round: u8) -> impl Iterator<Item = u8> {
    (0..PAGE_SIZE).map(move |i| (i as u8) ^ (page as u8).wrapping_mul(31) ^ (page >> 8) as u8 ^ round)
}

#[test]
fn parity_survives_sparse_writes_and_discards_with_two_hosts_stopped() {
    clustermem_runtime::check_userfaultfd().expect("this test needs userfaultfd");
    let mut hosts: Vec<Option<RunningHost>> =
        (0..6).map(|_| Some(MemoryHost::bind("127.0.0.1:0", 64 << 20).expect("bind").spawn())).collect();
    let addrs = hosts.iter().flatten().map(|h| h.addr().to_string()).collect();
    let redundancy: Redundancy = "erasure:4+2".parse().expect("valid");
    let runtime = Runtime::start(RuntimeConfig {
        hosts: addrs,
        local_mem_bytes: (64 * PAGE_SIZE) as u64,
        // Eight spans of 256 pages, each placed on its own.
        slab_bytes: 256 * PAGE_SIZE,
        redundancy,
        ..RuntimeConfig::default()
    })
    .expect("starting the runtime");
    let mut region = runtime.map_with(PAGES * PAGE_SIZE, PrefetchMode::Off, redundancy).expect("map");
    let mut model = vec![0u8; PAGES * PAGE_SIZE];
    let bytes = region.as_mut_slice();
    for page in 0..PAGES {
        let at = page * PAGE_SIZE;
        for ((b, m), v) in
            bytes[at..at + PAGE_SIZE].iter_mut().zip(&mut model[at..at + PAGE_SIZE]).zip(fill(page, 0))
        {
            *b = v;
            *m = v;
        }
    }
    // Sparse changes, several to some pages, each written back on eviction or flush: the
    // parity hosts only ever get XORs of changes.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..3000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x as usize % PAGES) * PAGE_SIZE + (x >> 32) as usize % (PAGE_SIZE - 8);
        let v = (round * 0x9E37_79B9).to_le_bytes();
        bytes[at..at + 8].copy_from_slice(&v);
        model[at..at + 8].copy_from_slice(&v);
    }
    // Discards: parts of rows (zeroed through parity), two whole rows (discarded on every
    // host as they are), and a range ending in the middle of a row.
    for (first, count) in [(103, 10), (640, 128), (900, 100), (5, 1)] {
        region.discard(first * PAGE_SIZE, count * PAGE_SIZE).expect("discard");
        model[first * PAGE_SIZE..(first + count) * PAGE_SIZE].fill(0);
    }
    // Some discarded pages written again, sparsely.
    let bytes = region.as_mut_slice();
    for page in [104, 650, 901, 999, 5] {
        let at = page * PAGE_SIZE + 64 * (page % 64);
        bytes[at..at + 3].copy_from_slice(b"new");
        model[at..at + 3].copy_from_slice(b"new");
    }
    region.flush().expect("flush");
    assert!(region.error().is_none(), "{:?}", region.error());
    // Two hosts gone: every page on them must be decoded from its stripe.
    hosts[1] = None;
    hosts[4] = None;
    // Their connections end within the hosts' shutdown poll (100 ms), and the runtime sees
    // them close.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let bytes = region.as_slice();
    for page in 0..PAGES {
        let at = page * PAGE_SIZE;
        assert!(
            bytes[at..at + PAGE_SIZE] == model[at..at + PAGE_SIZE],
            "page {page} differs after two hosts stopped"
        );
    }
    assert!(region.error().is_none(), "{:?}", region.error());
    let stats = runtime.stats().snapshot();
    assert_eq!(stats.hosts_lost, 2, "{stats:?}");
    assert!(stats.degraded_reads > 0, "pages were decoded: {stats:?}");
}
