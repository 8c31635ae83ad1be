//! Pointer-directed prefetch: when a page arrives for a fault, the pages that the values near
//! the faulting address point to are fetched too, and so on along the chain, each abandoned
//! if it misses its deadline.
//!
//! Chased by the client, a serial chain (a linked list) advances one round trip per hop, and
//! a walker that needs each node right after the last catches up with it at every hop: it
//! still waits once per node, if for less time. So where the chain's next page lives on a
//! host that offers it (`FEATURE_CHASE_POINTERS`), the host is asked to follow the chain
//! through its own copy (`ChasePointers`): one round trip yields `HOST_HOPS` addresses, whose
//! pages are then requested together and arrive back to back, installed while the walker is
//! still waiting for the first. The host's copy may be older than a page the client holds
//! dirty: a stale pointer only misdirects a prefetch, since pages are read only through the
//! usual requests, which see every write-back sent before them.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use clustermem_proto::{Message, PAGE_SIZE};

use super::{Core, PageState, RegionState, ShardState};
use crate::stats::RuntimeStats;
use crate::transport::{ChainRequest, ChaseRead, Pending};

/// Pointer prefetch: hops a chain may run ahead of the last page a thread was seen to need.
/// A linked list is walked serially, so only a chain that runs ahead saves faults; the bound
/// stops one that follows pointers nobody will use.
const CHASE_DEPTH: u8 = 16;
/// The same bound for a chain its hosts follow: its pages come back to back, so it may run
/// further ahead for the same wait.
const HOST_CHASE_DEPTH: u8 = 128;
/// Pointers a host follows per `ChasePointers`.
const HOST_HOPS: u8 = 32;
/// `ChasePointers` requests in flight at once, across regions.
const HOST_CHASES_IN_FLIGHT: usize = 8;
/// A region with more spans is chased by the client alone: the span table goes with every
/// `ChasePointers` (8 bytes a span: 4 KiB, a 32 GiB region of 64 MiB slabs).
const MAX_CHASE_SPANS: usize = 512;
/// Pointers followed per scanned page (a 64-byte line holds 8).
const POINTERS_PER_PAGE: usize = 8;
/// Lines (or pages) scanned for one arrival, at most: a chain's whole depth, with room for
/// a few branches.
const MAX_SCANS: usize = CHASE_DEPTH as usize * POINTERS_PER_PAGE;
/// Pointer prefetches in flight at once, across regions: bounds fan-out (trees, junk), and
/// holds a host-followed chain's whole lead.
const CHASES_IN_FLIGHT: usize = 128;

impl Core {
    /// After a page arrived (or was found resident) for an access at byte `offset` (None:
    /// unknown), fetches the pages that the 8-byte values of that access's 64-byte line point
    /// to (the whole page's when the offset is unknown, at most POINTERS_PER_PAGE). Targets
    /// that are resident are scanned at once, from the line pointed to, so a chain runs
    /// through the cache without a round trip; fetched targets continue it when they arrive.
    /// Pages with no values in the region (random data, indices) issue nothing.
    pub(super) fn follow_pointers(&mut self, id: u32, page: usize, offset: Option<u16>, depth: u8) {
        let Some(region) = self.regions.get_mut(&id) else { return };
        let mut work = std::mem::take(&mut self.chase_work);
        let mut starts = std::mem::take(&mut self.chase_starts);
        work.push((page, offset, depth));
        let mut scans = 0;
        while let Some((page, offset, depth)) = work.pop() {
            if region.pages[page] & PageState::RESIDENT == 0 || depth >= CHASE_DEPTH {
                continue;
            }
            // Resident pointers are followed at once, so a web of them (a hash table's
            // entries pointing at each other) would be walked path by path, up to
            // POINTERS_PER_PAGE^CHASE_DEPTH scans: redis under `run --prefetch pointer` kept
            // the handler busy for seconds on one arrival.
            scans += 1;
            if scans > MAX_SCANS {
                break;
            }
            let bytes = match offset {
                Some(o) => usize::from(o) & !63..(usize::from(o) & !63) + 64,
                None => 0..PAGE_SIZE,
            };
            let mut pointers = 0;
            for at in bytes.step_by(8) {
                // SAFETY: the page is resident (only this thread evicts) and mapped for the
                // region's life, and `at` is an aligned word inside it. A racing store may
                // give an old value, which only misdirects a prefetch.
                let value = unsafe { std::ptr::read_volatile((region.addr(page) + at) as *const u64) };
                let Some(rel) = region_offset(region, value) else { continue };
                pointers += 1;
                if pointers > POINTERS_PER_PAGE {
                    break;
                }
                let (target, target_offset) = (rel / PAGE_SIZE, (rel % PAGE_SIZE) as u16);
                let state = region.pages[target];
                if state & PageState::RESIDENT != 0 {
                    if work.len() < usize::from(CHASE_DEPTH) * POINTERS_PER_PAGE {
                        work.push((target, Some(target_offset), depth + 1));
                    }
                    continue;
                }
                let fetchable = PageState::only_on_host(state) && self.chases < CHASES_IN_FLIGHT;
                let Some((slab, slab_page)) = region.read_copy(target).filter(|_| fetchable) else {
                    continue;
                };
                claim(region, target, &mut self.chases, &self.stats);
                starts.push(ChaseStart {
                    value,
                    page: target,
                    offset: target_offset,
                    depth: depth + 1,
                    read: (slab.host, slab.slab_id, slab_page),
                    // From a whole-page scan, any of its values may be the one that matters:
                    // too many guesses to hand each a long chain on the host.
                    line_known: offset.is_some(),
                });
            }
        }
        work.clear();
        self.chase_work = work;
        // The chain goes on from each page requested: where its host follows pointers, it is
        // asked to, and the page's own arrival then adds nothing; otherwise that arrival
        // continues the chain here (see `chase_arrived`).
        for start in starts.drain(..) {
            let host_follows = start.line_known && self.ask_host_to_chase(id, start.value, start.depth);
            let (host, slab_id, first_page) = start.read;
            let chase = ChaseRead {
                region: id,
                page: start.page,
                offset: start.offset,
                depth: start.depth,
                host_follows,
            };
            self.links[host]
                .send(&Message::ReadPages { slab_id, first_page, count: 1 }, Pending::Chase(chase));
        }
        self.chase_starts = starts;
    }

    /// A page arrived for a thread's fault: a chain starts at the faulting access, and one
    /// stopped at its bound is given up (the thread faulted past it, or elsewhere).
    pub(super) fn chase_from_fault(&mut self, id: u32, page: usize, offset: Option<u16>) {
        if let Some(region) = self.regions.get_mut(&id) {
            region.stalled_chain = None;
        }
        self.follow_pointers(id, page, offset, 0);
    }

    /// Drops pointer prefetches that missed their deadline and nobody waits for: their pages
    /// are no longer in flight (a fault on one fetches it normally) and their replies are
    /// ignored. Requests on a link were sent in order, so the scan stops at the first young one.
    pub(super) fn expire_chases(&mut self) {
        if self.chases == 0 {
            return;
        }
        let now = Instant::now();
        for link in &mut self.links {
            for (_, pending, sent) in &mut link.pending {
                if now.duration_since(*sent) <= self.config.prefetch_deadline {
                    break;
                }
                let Pending::Chase(ChaseRead { region, page, .. }) = *pending else { continue };
                let Some(r) = self.regions.get_mut(&region) else { continue };
                if r.pages[page] & PageState::WANTED != 0 {
                    continue;
                }
                r.pages[page] &= !(PageState::FETCHING | PageState::PREFETCHED);
                pending.ignore(&mut link.demand_reads);
                self.chases -= 1;
                self.stats.prefetch_abandoned.fetch_add(1, Relaxed);
            }
        }
    }

    /// How far ahead of a thread a host-followed chain may run: a quarter of local memory at
    /// most, so its pages, installed cold, are not evicted before the walk gets to them.
    fn host_chase_bound(&self) -> u8 {
        u8::try_from(self.config.capacity_pages / 4).unwrap_or(u8::MAX).clamp(1, HOST_CHASE_DEPTH)
    }

    /// Asks the host of the page holding address `start` to follow the chain from there
    /// (`depth` hops from where a thread was last seen), if it can and the bounds allow.
    /// Returns whether the request was sent.
    fn ask_host_to_chase(&mut self, id: u32, start: u64, depth: u8) -> bool {
        let bound = self.host_chase_bound();
        if depth >= bound || self.host_chases >= HOST_CHASES_IN_FLIGHT {
            return false;
        }
        // A host follows a chain through whole spans it holds: an erasure-coded span is
        // dealt out in chunks.
        let Some(region) =
            self.regions.get(&id).filter(|r| r.slabs.len() <= MAX_CHASE_SPANS && r.coder.is_none())
        else {
            return false;
        };
        let Some((slab, _)) = region_offset(region, start).and_then(|rel| region.read_copy(rel / PAGE_SIZE))
        else {
            return false;
        };
        if !self.links[slab.host].chases_pointers {
            return false;
        }
        self.chase_spans.clear();
        for placement in &region.slabs {
            let here = placement.as_ref().and_then(|p| {
                p.shards.iter().find(|s| s.slab.host == slab.host && matches!(s.state, ShardState::Live))
            });
            self.chase_spans.extend_from_slice(&here.map_or(0, |s| s.slab.slab_id).to_le_bytes());
        }
        let hops = HOST_HOPS.min(bound - depth);
        let msg = Message::ChasePointers {
            start,
            hops,
            base: region.base as u64,
            span_bytes: (region.slab_pages * PAGE_SIZE) as u64,
            slabs: &self.chase_spans,
        };
        let request = ChainRequest { region: id, host_asked: slab.host, start, depth, hops };
        self.links[slab.host].send(&msg, Pending::ChaseList(request));
        self.host_chases += 1;
        self.stats.pointer_chains_offloaded.fetch_add(1, Relaxed);
        true
    }

    /// A pointer prefetch of `page` (pointed to at byte `offset`, `depth` hops ahead of a
    /// thread; its successors asked of its host when `host_follows`) arrived, `sent` when
    /// requested.
    pub(super) fn chase_arrived(&mut self, chase: ChaseRead, data: &[u8], sent: Instant) {
        let ChaseRead { region: id, page, offset, depth, host_follows } = chase;
        self.chases -= 1;
        self.stats.pages_fetched.fetch_add(1, Relaxed);
        self.stats.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
        let Some(r) = self.regions.get_mut(&id) else { return };
        let state = r.pages[page];
        if state & (PageState::FETCHING | PageState::RESIDENT) != PageState::FETCHING {
            return;
        }
        let wanted = state & PageState::WANTED != 0;
        if !wanted && sent.elapsed() > self.config.prefetch_deadline {
            // Too late to count on: leave the page to fault normally.
            r.pages[page] &= !(PageState::FETCHING | PageState::PREFETCHED);
            self.stats.prefetch_abandoned.fetch_add(1, Relaxed);
            return;
        }
        self.install(id, page, &data[..PAGE_SIZE], false);
        self.resume_stalled_chain(id, wanted.then_some(depth));
        if wanted {
            // A thread waiting here has caught up with the chain: its lead may grow again.
            self.follow_pointers(id, page, Some(offset), 0);
        } else if !host_follows {
            self.follow_pointers(id, page, Some(offset), depth);
        }
    }

    /// Goes on with region `id`'s host-followed chain that stopped at a bound, once the
    /// bound allows: the lead, when a thread caught up with the chain at `caught_up` hops
    /// (its lead is then counted from there); the chases in flight, when half have arrived.
    fn resume_stalled_chain(&mut self, id: u32, caught_up: Option<u8>) {
        let Some(&(start, depth)) = self.regions.get(&id).and_then(|r| r.stalled_chain.as_ref()) else {
            return;
        };
        let lead = caught_up.map_or(depth, |d| depth.saturating_sub(d));
        if lead >= self.host_chase_bound() || self.chases >= CHASES_IN_FLIGHT / 2 {
            if let Some(r) = self.regions.get_mut(&id) {
                r.stalled_chain = Some((start, lead));
            }
            return;
        }
        if self.ask_host_to_chase(id, start, lead) {
            if let Some(r) = self.regions.get_mut(&id) {
                r.stalled_chain = None;
            }
        }
    }

    /// A host answered a `ChasePointers`: requests the pages of the chain's addresses (each
    /// the successor of the one before, the first of `request.start`), and asks for the chain's
    /// next stretch at once, so its pages are requested before the walker gets there. Where
    /// a bound stops it (the lead, the chases in flight), the chain is marked stalled, to go
    /// on when a thread catches up with it.
    pub(super) fn chain_arrived(&mut self, request: ChainRequest, addresses: &[u8]) {
        let ChainRequest { region: id, host_asked, start, depth, hops } = request;
        self.host_chases -= 1;
        let Some(region) = self.regions.get_mut(&id) else { return };
        // The last address whose successors are requested or asked for, and its depth.
        let (mut last, mut last_depth) = (start, depth);
        let mut last_page = None;
        let mut listed = 0;
        for address in addresses.chunks_exact(8) {
            let value = u64::from_le_bytes(address.try_into().expect("8 bytes"));
            // A value outside the region: a host answering nonsense. Nothing to follow.
            let Some(rel) = region_offset(region, value) else { return };
            let (page, offset) = (rel / PAGE_SIZE, (rel % PAGE_SIZE) as u16);
            let hop_depth = last_depth.saturating_add(1);
            let fetchable = PageState::only_on_host(region.pages[page]);
            if let Some((slab, slab_page)) = region.read_copy(page).filter(|_| fetchable) {
                if self.chases >= CHASES_IN_FLIGHT {
                    // Its page is not requested: the chain resumes from the address before.
                    region.stalled_chain = Some((last, last_depth));
                    return;
                }
                let chase = ChaseRead { region: id, page, offset, depth: hop_depth, host_follows: true };
                self.links[slab.host].send(
                    &Message::ReadPages { slab_id: slab.slab_id, first_page: slab_page, count: 1 },
                    Pending::Chase(chase),
                );
                claim(region, page, &mut self.chases, &self.stats);
            }
            (last, last_depth, last_page) = (value, hop_depth, Some(page));
            listed += 1;
        }
        let Some(last_page) = last_page else { return };
        // Fewer hops than asked with the last on the same host: the chain ended there.
        let went_on = listed == usize::from(hops)
            || region.read_copy(last_page).is_some_and(|(slab, _)| slab.host != host_asked);
        if went_on && !self.ask_host_to_chase(id, last, last_depth) {
            if let Some(region) = self.regions.get_mut(&id) {
                region.stalled_chain = Some((last, last_depth));
            }
        }
    }
}

/// A page a chain goes on to, found by `follow_pointers`: requested once every scan is done.
pub(super) struct ChaseStart {
    /// The address pointing into the page.
    value: u64,
    page: usize,
    offset: u16,
    depth: u8,
    /// Host, slab and page in the slab to read it from.
    read: (usize, u64, u64),
    /// Found in the one line an access touched (not in a whole-page scan).
    line_known: bool,
}

/// Where address `value` lies in `region` (bytes from its start), if it does.
fn region_offset(region: &RegionState, value: u64) -> Option<usize> {
    let rel = usize::try_from(value).ok()?.checked_sub(region.base)?;
    (rel < region.pages.len() * PAGE_SIZE).then_some(rel)
}

/// Marks `page` of `region` as fetched by a pointer prefetch, and counts it.
fn claim(region: &mut RegionState, page: usize, chases: &mut usize, stats: &RuntimeStats) {
    region.pages[page] |= PageState::FETCHING | PageState::PREFETCHED;
    *chases += 1;
    stats.prefetch_issued.fetch_add(1, Relaxed);
    stats.pointer_prefetch_issued.fetch_add(1, Relaxed);
}
