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

/// Writes `page ^ round`-derived bytes to every page of `region`.
fn fill_region(region: &mut clustermem_runtime::Region<'_>, round: u8) {
    let bytes = region.as_mut_slice();
    for (page, chunk) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
        for (b, v) in chunk.iter_mut().zip(fill(page, round)) {
            *b = v;
        }
    }
}

fn assert_region(region: &clustermem_runtime::Region<'_>, round: u8, what: &str) {
    for (page, chunk) in region.as_slice().chunks_exact(PAGE_SIZE).enumerate() {
        assert!(chunk.iter().copied().eq(fill(page, round)), "{what}: page {page} differs");
    }
}

/// Memory mapped while a host is down is placed on the live ones, its missing shards (and
/// the lost host's) are rebuilt onto the host when it comes back at its address, and then
/// another host can be lost: every page of both regions reads back, decoded through the
/// rebuilt shards.
#[test]
fn spans_placed_while_a_host_is_down_are_completed_when_it_returns() {
    clustermem_runtime::check_userfaultfd().expect("this test needs userfaultfd");
    let start = |addr: &str| MemoryHost::bind(addr, 64 << 20).expect("bind").spawn();
    let mut hosts: Vec<Option<RunningHost>> = (0..3).map(|_| Some(start("127.0.0.1:0"))).collect();
    let addrs: Vec<String> = hosts.iter().flatten().map(|h| h.addr().to_string()).collect();
    let redundancy: Redundancy = "erasure:2+1".parse().expect("valid");
    let runtime = Runtime::start(RuntimeConfig {
        hosts: addrs.clone(),
        local_mem_bytes: (64 * PAGE_SIZE) as u64,
        slab_bytes: 256 * PAGE_SIZE,
        redundancy,
        ..RuntimeConfig::default()
    })
    .expect("starting the runtime");
    let stats = || runtime.stats().snapshot();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what} never happened: {:?}", stats());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let mut before = runtime.map_with(512 * PAGE_SIZE, PrefetchMode::Off, redundancy).expect("map");
    fill_region(&mut before, 1);
    before.flush().expect("flush");

    hosts[2] = None;
    wait_for("the stopped host seen dead", &|| stats().hosts_lost == 1);
    let mut during =
        runtime.map_with(512 * PAGE_SIZE, PrefetchMode::Off, redundancy).expect("map with a host down");
    fill_region(&mut during, 2);
    during.flush().expect("flush");
    assert!(stats().spans_rebuilding > 0, "shards wait for a host: {:?}", stats());

    hosts[2] = Some(start(&addrs[2]));
    wait_for("the rebuild onto the returned host", &|| stats().spans_rebuilding == 0);
    assert!(stats().pages_rebuilt > 0, "{:?}", stats());

    hosts[0] = None;
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_region(&before, 1, "mapped before the loss");
    assert_region(&during, 2, "mapped during the loss");
    assert!(
        before.error().is_none() && during.error().is_none(),
        "{:?} {:?}",
        before.error(),
        during.error()
    );
    assert_eq!(stats().hosts_lost, 2, "{:?}", stats());
    assert!(stats().degraded_reads > 0, "pages were decoded: {:?}", stats());
}
