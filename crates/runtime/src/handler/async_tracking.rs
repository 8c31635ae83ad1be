//! Async dirty tracking (`UFFD_FEATURE_WP_ASYNC`): stores never wait for the handler; the
//! kernel clears a page's write protection itself on the first store, and `PAGEMAP_SCAN`
//! later reports which pages were written (and protects them again).
//!
//! Evicting is the hard part: with no fault to hold a writer, a store could land between the
//! moment we decide a page is clean (or copy it for write-back) and the moment we drop it, and
//! be lost. So a victim leaves with `UFFDIO_MOVE`, which takes the page out of the region
//! atomically (a later touch faults to us as missing); what was moved is then the page's last
//! word. Whether it changed since its host copy: `PAGEMAP_SCAN` says if it was written before
//! the scan, and a copy taken before the scan, compared with what was moved, catches a store
//! between the scan and the move.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use clustermem_mmap::AnonMapping;
use clustermem_proto::PAGE_SIZE;
use clustermem_uffd::{PagemapScanner, RegisterMode, Uffd, UffdError};

use super::{chain, key, unkey, Core, PageState};
use crate::policy::{PageKey, PageMap};
use crate::RuntimeError;

/// Pages of the staging area victims are moved into when no ring is kept (a small local
/// memory): dropped together at the end of each eviction batch.
pub(super) const STAGING_PAGES: usize = 256;
/// A ring of recent victims is kept when it can hold 1/RING_SHARE of local memory and at
/// least STAGING_PAGES (one eviction batch).
const RING_SHARE: usize = 16;
/// Slots dropped at once ahead of the ring's head: one `MADV_DONTNEED` (and TLB flush) per
/// this many victims rather than one per run.
const DROP_AHEAD: usize = 64;

/// What async tracking needs besides the userfaultfd.
pub(crate) struct AsyncTracker {
    scanner: PagemapScanner,
    /// Where eviction victims are moved: registered with the same userfaultfd (`UFFDIO_MOVE`
    /// requires it), and never touched by the program.
    staging: AnonMapping,
    /// The page each slot of `staging` holds (None: empty, or not known to hold one).
    slots: Vec<Option<PageKey>>,
    /// The slot holding each staged page.
    staged_at: PageMap<PageKey, usize>,
    /// The next slot to fill, and the end of the run of slots from it known to be empty.
    head: usize,
    empty_until: usize,
    /// Local memory kept for staged pages, which stay until their slots are needed again (a
    /// ring of recent victims); 0: they leave at the end of each eviction batch.
    ring_pages: usize,
    /// Victims' bytes taken before their scan.
    before: Box<[u8]>,
    /// Which victims of a run were written before their scan.
    written: Vec<bool>,
    /// Reused batch of eviction victims.
    victims: Vec<PageKey>,
    /// Written runs found by a flusher sweep.
    runs: Vec<(usize, usize)>,
    /// The periodic sweep under way: (region, address to go on from), the next one last.
    sweep: Vec<(u32, usize)>,
    /// Failures already reported, by operation and errno: each is said once (a move fails
    /// again for every page shared after a fork, a scan for every sweep round).
    reported: Vec<(&'static str, Option<i32>)>,
}

impl AsyncTracker {
    /// Opens the pagemap and maps and registers the staging area on `uffd`, which must have
    /// been opened with `WP_ASYNC` and `MOVE`. With `capacity_pages` of local memory, a ring
    /// of recent victims is kept if it is large enough to be worth it (see `ring_for`).
    pub(crate) fn new(uffd: &Uffd, capacity_pages: usize) -> Result<Self, RuntimeError> {
        let scanner = PagemapScanner::open()
            .map_err(|source| RuntimeError::Os { what: "opening /proc/self/pagemap", source })?;
        let ring = ring_for(capacity_pages);
        let len = ring.max(STAGING_PAGES);
        let staging = AnonMapping::new(len * PAGE_SIZE)
            .map_err(|source| RuntimeError::Os { what: "mapping the eviction staging area", source })?;
        // `UFFDIO_MOVE` wants the destination registered on the same userfaultfd and both
        // ends with the same access flags and protection: register it as the regions are.
        let mode = RegisterMode { missing: true, write_protect: true };
        // SAFETY: the staging area is this tracker's own mapping, nothing else holds its
        // address; the handler only ever reads pages it moved there itself.
        unsafe { uffd.register(staging.as_ptr() as usize, staging.len(), mode) }?;
        // A forked child must not share the staged pages: a page shared with a child cannot
        // be moved back (`EBUSY`), and the child has no use for it.
        // SAFETY: madvise on the tracker's own mapping; DONTFORK changes only what a child gets.
        if unsafe { libc::madvise(staging.as_ptr().cast(), staging.len(), libc::MADV_DONTFORK) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(RuntimeError::Os {
                what: "keeping the eviction staging area out of forked children",
                source,
            });
        }
        Ok(Self {
            scanner,
            staging,
            slots: vec![None; len],
            staged_at: PageMap::default(),
            head: 0,
            empty_until: len,
            ring_pages: ring,
            before: vec![0u8; STAGING_PAGES * PAGE_SIZE].into_boxed_slice(),
            written: Vec::new(),
            victims: Vec::new(),
            runs: Vec::new(),
            sweep: Vec::new(),
            reported: Vec::new(),
        })
    }

    /// Local memory the ring of recent victims keeps (0: no ring).
    pub(crate) fn ring_pages(&self) -> usize {
        self.ring_pages
    }

    /// Address of slot `slot`.
    fn slot_addr(&self, slot: usize) -> usize {
        self.staging.as_ptr() as usize + slot * PAGE_SIZE
    }

    /// Takes `n` adjacent empty slots (n <= STAGING_PAGES) at the head, dropping the oldest
    /// staged pages to make room. Returns the first.
    fn take_slots(&mut self, n: usize) -> usize {
        if self.head + n > self.slots.len() {
            self.head = 0;
            self.empty_until = 0;
        }
        if self.empty_until < self.head + n {
            let end = (self.head + n.max(DROP_AHEAD)).min(self.slots.len());
            self.drop_slots(self.head, end);
            self.empty_until = end;
        }
        let first = self.head;
        self.head += n;
        first
    }

    /// Drops the pages in slots `from..to` (their write-backs were queued, which copied them).
    fn drop_slots(&mut self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        for slot in from..to {
            if let Some(k) = self.slots[slot].take() {
                if self.staged_at.get(&k) == Some(&slot) {
                    self.staged_at.remove(&k);
                }
            }
        }
        // SAFETY: the staging area is the tracker's own mapping; dropping its pages leaves
        // the slots empty for the next moves.
        let rc = unsafe {
            libc::madvise(
                self.slot_addr(from) as *mut libc::c_void,
                (to - from) * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        debug_assert_eq!(rc, 0);
    }

    /// Drops every staged page (one `MADV_DONTNEED` over the whole area: empty slots cost
    /// nothing to drop).
    fn drop_all(&mut self) {
        self.drop_slots(0, self.slots.len());
        self.head = 0;
        self.empty_until = self.slots.len();
    }

    /// Whether a failure of `op` with `e`'s errno is new (and notes it).
    fn first_report(&mut self, op: &'static str, e: &UffdError) -> bool {
        let errno = e.ioctl_errno();
        let new = !self.reported.contains(&(op, errno));
        if new {
            self.reported.push((op, errno));
        }
        new
    }
}

/// Local memory kept for the ring of recent victims with `capacity_pages` of it (0: none).
fn ring_for(capacity_pages: usize) -> usize {
    let ring = capacity_pages / RING_SHARE;
    if ring >= STAGING_PAGES {
        ring
    } else {
        0
    }
}

impl Core {
    /// Serves a fault on page `page` of region `id` from the ring of recent victims, if the
    /// page is there: moved back (no network trip) and resident again. Returns whether it was.
    /// The page is clean (its write-back was queued when it left); its host copy is current,
    /// unless another thread stored into it between the move and its protection (below).
    pub(super) fn rescue(&mut self, id: u32, page: usize) -> bool {
        let k = key(id, page);
        let Some(tracker) = self.tracker.as_mut() else { return false };
        let Some(&slot) = tracker.staged_at.get(&k) else { return false };
        tracker.staged_at.remove(&k);
        if tracker.slots[slot] != Some(k) {
            return false;
        }
        tracker.slots[slot] = None;
        let from = tracker.slot_addr(slot);
        // What its host holds: the bytes in the slot, which nothing else maps or writes.
        // SAFETY: the slot holds the page moved there at its eviction, stable until moved.
        tracker.before[..PAGE_SIZE]
            .copy_from_slice(unsafe { std::slice::from_raw_parts(from as *const u8, PAGE_SIZE) });
        let region = self.regions.get_mut(&id).expect("caller checked");
        let addr = region.addr(page);
        // SAFETY: the slot holds the page moved there at its eviction (the slot and the map
        // agree); the region's page is not resident (the caller checked), so it is empty.
        let (moved, result) = unsafe { self.uffd.move_pages(addr, from, PAGE_SIZE) };
        if moved < PAGE_SIZE {
            if let Err(e) = result {
                let tracker = self.tracker.as_mut().expect("async tracking");
                if tracker.first_report("move back", &e) {
                    eprintln!(
                        "clustermem: cannot move back page {addr:#x} (fetched instead; said once): {}",
                        chain(&e)
                    );
                }
            }
            return false;
        }
        // The move made the page writable and unprotected, which `PAGEMAP_SCAN` would report
        // as written: protect it before the thread runs, so its next store is seen as one.
        if let Err(e) = self.uffd.write_protect(addr, PAGE_SIZE, true, false) {
            // Left unprotected, it counts as written: one needless write-back, nothing lost.
            let tracker = self.tracker.as_mut().expect("async tracking");
            if tracker.first_report("protect", &e) {
                eprintln!("clustermem: cannot protect page {addr:#x} moved back (said once): {}", chain(&e));
            }
        }
        // Between the move and the protection the page was mapped writable and unprotected:
        // a store by another thread then is in the page but would never be reported as a
        // write, and its next eviction would drop it (`pages_moved_back_...` in data_path
        // lost a store so, in 2 of 3 full runs of that test binary on a loaded machine).
        // Every store from now on is reported, so a page that differs from its host copy
        // now took one in that window: written back at once. Compared and sent from a copy
        // in the eviction buffer's second page, as the sweep sends pages.
        let mut buffer = std::mem::take(&mut self.tracker.as_mut().expect("async tracking").before);
        // SAFETY: the page is resident (moved just now), mapped and readable. A store racing
        // the copy may tear it, but comes after the protection: a scan reports it, and the
        // page goes again.
        unsafe {
            std::ptr::copy_nonoverlapping(addr as *const u8, buffer[PAGE_SIZE..].as_mut_ptr(), PAGE_SIZE);
        };
        let (host, now) = buffer.split_at(PAGE_SIZE);
        if now[..PAGE_SIZE] != *host {
            self.write_back_data(id, page, &now[..PAGE_SIZE]);
        }
        self.tracker.as_mut().expect("async tracking").before = buffer;
        let region = self.regions.get_mut(&id).expect("caller checked");
        region.pages[page] |= PageState::RESIDENT;
        self.resident += 1;
        self.policy.insert(k);
        self.policy.touch(k);
        self.stats.rescued_faults.fetch_add(1, Relaxed);
        self.last_wake = Instant::now();
        let _ = self.uffd.wake(addr, PAGE_SIZE);
        self.enforce_limit_if_far_over();
        true
    }

    /// Evicts until resident pages fit the local-memory limit, under async tracking:
    /// victims are taken a batch at a time and adjacent ones leave together (one scan, one
    /// move and one TLB flush a run).
    pub(super) fn enforce_limit_moving(&mut self) {
        let mut victims = std::mem::take(&mut self.tracker.as_mut().expect("async tracking").victims);
        'batches: while self.over_limit() > 0 {
            victims.clear();
            let want = self.over_limit().min(STAGING_PAGES);
            victims.extend(std::iter::from_fn(|| self.policy.evict()).take(want));
            if victims.is_empty() {
                break;
            }
            victims.sort_unstable();
            // A page the policy named twice must leave once: moving it again would make this
            // thread read a page it has just taken out (and fault on its own userfaultfd).
            victims.dedup();
            let regions = &self.regions;
            victims.retain(|&v| {
                let (id, page) = unkey(v);
                regions.get(&id).is_some_and(|r| r.pages[page] & PageState::RESIDENT != 0)
            });
            let mut i = 0;
            while i < victims.len() {
                let n = 1 + victims[i + 1..]
                    .iter()
                    .zip(&victims[i..])
                    .take_while(|(b, a)| **b == **a + 1)
                    .count();
                let moved = self.evict_run_moving(&victims[i..i + n]);
                if moved < n {
                    // Over the limit for now rather than spin on pages that cannot leave.
                    for &v in &victims[i + moved..] {
                        self.policy.put_back(v);
                    }
                    break 'batches;
                }
                i += n;
            }
        }
        let tracker = self.tracker.as_mut().expect("async tracking");
        if tracker.ring_pages == 0 {
            tracker.drop_all();
        }
        tracker.victims = victims;
    }

    /// Moves the resident pages `run` (adjacent, of one region) out, writes back those that
    /// changed, and marks them gone. Returns how many left (from the start of the run).
    fn evict_run_moving(&mut self, run: &[PageKey]) -> usize {
        let (id, first) = unkey(run[0]);
        let n = run.len();
        let Some(region) = self.regions.get(&id) else { return n };
        let addr = region.addr(first);
        let len = n * PAGE_SIZE;
        let started = Instant::now();
        let tracker = self.tracker.as_mut().expect("async tracking");
        let first_slot = tracker.take_slots(n);
        // SAFETY: the pages are resident (victims), mapped and readable. Program threads may
        // store into them meanwhile (async tracking lets writers in): plain memory written
        // through raw pointers, which a byte copy may see torn. Such a store is caught by the
        // scan below, and then this copy is not used.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, tracker.before.as_mut_ptr(), len) };
        tracker.written.clear();
        tracker.written.resize(n, false);
        let written = &mut tracker.written;
        let scanned = tracker.scanner.scan_written(addr, addr + len, false, |s, e| {
            written[(s - addr) / PAGE_SIZE..(e - addr) / PAGE_SIZE].fill(true);
        });
        let slot = tracker.slot_addr(first_slot);
        let (mut moved, mut result) = match scanned {
            // SAFETY: the run is resident pages of a region this handler serves: a touch of
            // them after the move faults to us as missing, and the page state says to fetch.
            // `take_slots` emptied the slots.
            Ok(()) => unsafe { self.uffd.move_pages(slot, addr, len) },
            Err(e) => (0, Err(e)),
        };
        let mut first_slot = first_slot;
        if moved == 0 && result.as_ref().err().and_then(UffdError::ioctl_errno) == Some(libc::EEXIST) {
            // A slot is taken though none should be, and the victim is still in place (a
            // page the kernel moved anyway is counted by `move_pages`): drop every slot,
            // whose pages were all written back already, and try once more from the first.
            tracker.drop_all();
            first_slot = tracker.take_slots(n);
            // SAFETY: as above; the whole area is empty now.
            (moved, result) = unsafe { self.uffd.move_pages(tracker.slot_addr(first_slot), addr, len) };
        }
        let slot = tracker.slot_addr(first_slot);
        let moved = moved / PAGE_SIZE;
        if let Err(e) = result {
            // E.g. EBUSY: a forked child shares the page, and moving it would take it from
            // the child too. It stays until the sharing ends.
            if tracker.first_report("evict", &e) {
                let at = addr + moved * PAGE_SIZE;
                eprintln!(
                    "clustermem: cannot evict page {at:#x} (it stays resident; said once): {}",
                    chain(&e)
                );
            }
        }
        for k in 0..moved {
            tracker.slots[first_slot + k] = Some(key(id, first + k));
            tracker.staged_at.insert(key(id, first + k), first_slot + k);
        }
        self.stats.tracking_scans.fetch_add(1, Relaxed);
        self.stats.tracking_ns.fetch_add(elapsed_ns(started), Relaxed);
        for k in 0..moved {
            let tracker = self.tracker.as_ref().expect("async tracking");
            // SAFETY: the slot holds the page moved there just now; nothing else maps or
            // writes the staging area, so its bytes are stable until the slot is dropped.
            let last = unsafe { std::slice::from_raw_parts((slot + k * PAGE_SIZE) as *const u8, PAGE_SIZE) };
            let before = &tracker.before[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            // Not written before the scan: `before` is what its host holds; so it changed
            // if and only if a store came between the scan and the move.
            if tracker.written[k] || last != before {
                self.write_back_data(id, first + k, last);
            }
            self.forget_evicted(id, first + k);
        }
        moved
    }

    /// Writes back pages written since the last sweep, whole, write-protecting them again in
    /// the same `PAGEMAP_SCAN`: every page of region `only` at once (a flush), or, for the
    /// periodic flusher, about `limit` pages of the sweep under way (starting one if none
    /// is). Returns whether the sweep is complete.
    pub(super) fn write_back_written(&mut self, only: Option<u32>, limit: usize) -> bool {
        if let Some(id) = only {
            if let Some(base) = self.regions.get(&id).map(|r| r.base) {
                self.sweep_region(id, base, usize::MAX);
            }
            return true;
        }
        let mut sweep = std::mem::take(&mut self.tracker.as_mut().expect("async tracking").sweep);
        if sweep.is_empty() {
            sweep.extend(self.regions.iter().map(|(&id, r)| (id, r.base)));
            sweep.sort_unstable();
        }
        let mut left = limit;
        while let Some(&(id, from)) = sweep.last() {
            let Some(end) = self.regions.get(&id).map(|r| r.addr(r.pages.len())) else {
                sweep.pop();
                continue;
            };
            let (stop, sent) = self.sweep_region(id, from, left);
            if stop >= end {
                sweep.pop();
            } else {
                sweep.last_mut().expect("not empty").1 = stop;
            }
            left = left.saturating_sub(sent.max(1));
            if left == 0 {
                break;
            }
        }
        let done = sweep.is_empty();
        self.tracker.as_mut().expect("async tracking").sweep = sweep;
        done
    }

    /// Scans region `id` from address `from` for written pages, protecting and writing back
    /// up to `max_pages` of them. Returns where the scan stopped and how many were sent.
    fn sweep_region(&mut self, id: u32, from: usize, max_pages: usize) -> (usize, usize) {
        let region = &self.regions[&id];
        let (base, end) = (region.base, region.addr(region.pages.len()));
        let tracker = self.tracker.as_mut().expect("async tracking");
        let mut runs = std::mem::take(&mut tracker.runs);
        runs.clear();
        let started = Instant::now();
        let scanned = tracker.scanner.scan_written_upto(from, end, true, max_pages, |s, e| runs.push((s, e)));
        self.stats.tracking_scans.fetch_add(1, Relaxed);
        self.stats.tracking_ns.fetch_add(elapsed_ns(started), Relaxed);
        let stop = match scanned {
            Ok(stop) => stop,
            Err(e) => {
                if tracker.first_report("scan", &e) {
                    eprintln!(
                        "clustermem: cannot scan region {id} for written pages (said once): {}",
                        chain(&e)
                    );
                }
                end
            }
        };
        // The copy of the page being sent; the first slot of the eviction buffer, idle here.
        let mut copy = std::mem::take(&mut tracker.before);
        let mut sent = 0;
        let pages = runs.iter().flat_map(|&(start, stop)| (start..stop).step_by(PAGE_SIZE));
        for page in pages.map(|addr| (addr - base) / PAGE_SIZE) {
            if self.regions[&id].pages[page] & PageState::RESIDENT == 0 {
                continue;
            }
            let addr = base + page * PAGE_SIZE;
            // SAFETY: the page is resident, mapped and readable. A program thread's store
            // racing the copy (plain memory, written through raw pointers) may tear it, but
            // that store cleared the protection the scan just set, so the next sweep sends
            // the page again.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, copy.as_mut_ptr(), PAGE_SIZE) };
            self.write_back_data(id, page, &copy[..PAGE_SIZE]);
            sent += 1;
        }
        let tracker = self.tracker.as_mut().expect("async tracking");
        tracker.runs = runs;
        tracker.before = copy;
        self.stats.pages_flushed.fetch_add(sent as u64, Relaxed);
        (stop, sent)
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
