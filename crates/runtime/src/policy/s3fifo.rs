//! S3-FIFO (Yang et al., SOSP'23) adapted to a pager that sees misses, not hits.
//!
//! New pages enter a small probation FIFO. A page leaving probation unused goes to a ghost
//! queue (its key only); if it faults again while still remembered there, it was evicted too
//! early and is admitted straight to the main queue. The main queue is a CLOCK: a page seen in
//! use (a write fault) since the hand last passed gets another round. One-touch pages of a
//! scan thus do not displace the hot set, which lives in main: they take at most one main page
//! per cache's worth of them (below).
//!
//! The split between the queues adapts, as ARC's does: a miss on a page recently evicted from
//! probation moves the target of probation's share up, a miss on one recently evicted from
//! main moves it down, by more when the queue that lost the page is the smaller. A pager sees
//! no hits, so main (evicted only while probation is under its share) cannot tell that its
//! pages went cold; with a fixed 10% share, a new working set larger than that cycled through
//! probation, two misses a page, until main had turned over (redis answering reads of other
//! keys than it had just served). For the same reason main gives up its oldest page whenever
//! a cache's worth of pages has left probation since it last gave one up: else a page in main
//! that nobody uses again would stay for ever under a stream of one-touch pages.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::VecDeque;

use super::{EvictionPolicy, PageKey, PageMap, FIBONACCI};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    queue: Queue,
    /// Uses seen since the page entered its queue or the hand last passed it (saturates at 3).
    freq: u8,
    /// Bumped on every (re)insertion, so stale queue slots are recognised and skipped.
    generation: u64,
}

/// S3-FIFO over resident pages.
#[derive(Debug)]
pub struct S3Fifo {
    /// Probation's share of the pages, adapted between `min_small()` and `max_small()`.
    small_target: usize,
    entries: PageMap<PageKey, Entry>,
    small: VecDeque<(PageKey, u64)>,
    main: VecDeque<(PageKey, u64)>,
    small_len: usize,
    /// Pages recently evicted from probation, and from main.
    ghost: Ghost,
    main_ghost: Ghost,
    /// Pages probation gave up since main last gave one up, and the bound on it: a stream of
    /// one-touch pages keeps probation at its share, and without it main would keep a page
    /// nobody uses again for ever.
    small_evictions: usize,
    capacity: usize,
    next_generation: u64,
}

impl S3Fifo {
    /// A policy for `capacity` resident pages: probation starts at 10% (and stays within
    /// 1-90%), ghosts as large as the cache.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            small_target: (capacity / 10).max(1),
            entries: PageMap::default(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_len: 0,
            ghost: Ghost::new(capacity),
            main_ghost: Ghost::new(capacity),
            small_evictions: 0,
            capacity,
            next_generation: 0,
        }
    }

    fn push(&mut self, page: PageKey, queue: Queue, freq: u8) {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.entries.insert(page, Entry { queue, freq, generation });
        match queue {
            Queue::Small => {
                self.small.push_back((page, generation));
                self.small_len += 1;
            }
            Queue::Main => self.main.push_back((page, generation)),
        }
    }

    /// Bounds of probation's share: 1% and 90% of the pages.
    fn min_small(&self) -> usize {
        (self.capacity / 100).max(1)
    }

    fn max_small(&self) -> usize {
        (self.capacity * 9 / 10).max(1)
    }

    /// Pages tracked in main.
    fn main_len(&self) -> usize {
        self.entries.len() - self.small_len
    }

    /// Pops slots of `queue` until a live one: a page used since it was queued goes (back)
    /// to main with one use less; an unused one stops being tracked and is returned
    /// (remembered in the ghost if it leaves probation). One map lookup per slot: on a
    /// sequential read every page passes through here.
    fn evict_from(&mut self, queue: Queue) -> Option<PageKey> {
        loop {
            let (page, generation) = match queue {
                Queue::Small => self.small.pop_front()?,
                Queue::Main => self.main.pop_front()?,
            };
            let MapEntry::Occupied(mut slot) = self.entries.entry(page) else { continue };
            let entry = *slot.get();
            if entry.generation != generation || entry.queue != queue {
                continue; // A stale slot: the page was removed or queued again since.
            }
            if queue == Queue::Small {
                self.small_len -= 1;
            }
            if entry.freq > 0 {
                self.next_generation += 1;
                let freq = if queue == Queue::Small { 0 } else { entry.freq - 1 };
                *slot.get_mut() = Entry { queue: Queue::Main, freq, generation: self.next_generation };
                self.main.push_back((page, self.next_generation));
            } else {
                slot.remove();
                match queue {
                    Queue::Small => self.ghost.remember(page),
                    Queue::Main => self.main_ghost.remember(page),
                }
                return Some(page);
            }
        }
    }
}

/// The ghost: pages recently evicted from probation, by key only. A direct-mapped table of
/// (fingerprint, eviction number) per slot instead of an exact queue and map: one memory
/// access per eviction and per miss, no removals. A page is in the ghost if its slot still
/// holds it and fewer than `capacity` pages were remembered since; a newer page hashing to
/// the same slot makes it forgotten early, which only costs it the fast path to main.
#[derive(Debug)]
struct Ghost {
    /// `fingerprint << 32 | eviction number`; 0 is empty (fingerprints are odd). Twice the
    /// capacity, rounded up to a power of two, so few remembered pages collide; zeroed
    /// memory, so a large cache's table costs memory only as it fills.
    slots: Vec<u64>,
    capacity: u32,
    remembered: u32,
}

impl Ghost {
    fn new(capacity: usize) -> Self {
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX / 4).min(u32::MAX / 4);
        Self { slots: vec![0; (2 * capacity as usize).next_power_of_two()], capacity, remembered: 0 }
    }

    /// The page's slot and its fingerprint (odd, so never 0).
    fn locate(&self, page: PageKey) -> (usize, u64) {
        let hash = page.wrapping_mul(FIBONACCI);
        let slot = (hash >> 32) as usize & (self.slots.len() - 1);
        (slot, (page ^ page >> 32) & 0xFFFF_FFFF | 1)
    }

    fn remember(&mut self, page: PageKey) {
        let (slot, fingerprint) = self.locate(page);
        self.slots[slot] = fingerprint << 32 | u64::from(self.remembered);
        self.remembered = self.remembered.wrapping_add(1);
    }

    /// Whether `page` is remembered; forgets it.
    fn take(&mut self, page: PageKey) -> bool {
        let (slot, fingerprint) = self.locate(page);
        let held = self.slots[slot];
        // Remembered as number n, with k pages remembered after it: `remembered` is n + k + 1.
        let found = held >> 32 == fingerprint && self.remembered.wrapping_sub(held as u32) <= self.capacity;
        if found {
            self.slots[slot] = 0;
        }
        found
    }
}

impl EvictionPolicy for S3Fifo {
    fn insert(&mut self, page: PageKey) {
        // Steps as ARC's: larger when the queue that lost the page is the smaller one.
        let main_len = self.main_len();
        let queue = if self.ghost.take(page) {
            // Probation was too short for it to be seen again.
            let step = (main_len / self.small_len.max(1)).max(1);
            self.small_target = (self.small_target + step).min(self.max_small());
            Queue::Main
        } else if self.main_ghost.take(page) {
            // Main was too short: it had proved itself once already.
            let step = (self.small_len / main_len.max(1)).max(1);
            self.small_target = self.small_target.saturating_sub(step).max(self.min_small());
            Queue::Main
        } else {
            Queue::Small
        };
        self.push(page, queue, 0);
    }

    fn touch(&mut self, page: PageKey) {
        if let Some(e) = self.entries.get_mut(&page) {
            e.freq = (e.freq + 1).min(3);
        }
    }

    fn evict(&mut self) -> Option<PageKey> {
        // Main stands still only while it holds pages: an empty main is not stalled.
        let main_pages = self.main_len() > 0;
        let main_stalled = main_pages && self.small_evictions >= self.capacity;
        if (self.small_len >= self.small_target && !main_stalled) || !main_pages {
            if let Some(page) = self.evict_from(Queue::Small) {
                self.small_evictions = if main_pages { self.small_evictions + 1 } else { 0 };
                return Some(page);
            }
        }
        self.small_evictions = 0;
        self.evict_from(Queue::Main).or_else(|| self.evict_from(Queue::Small))
    }

    fn put_back(&mut self, page: PageKey) {
        // Its eviction did not happen: forget it in the ghosts rather than count it as a miss.
        self.ghost.take(page);
        self.main_ghost.take(page);
        self.push(page, Queue::Small, 0);
    }

    fn remove(&mut self, page: PageKey) {
        if let Some(e) = self.entries.remove(&page) {
            if e.queue == Queue::Small {
                self.small_len -= 1;
            }
        }
        // Stale slots are skipped when they surface; compact if they pile up.
        if self.small.len() + self.main.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            let live = |&(p, g): &(PageKey, u64)| entries.get(&p).is_some_and(|e| e.generation == g);
            self.small.retain(live);
            self.main.retain(live);
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{conformance, Fifo};

    #[test]
    fn conforms() {
        for seed in 1..4 {
            conformance::fuzz(Box::new(S3Fifo::new(50)), seed);
        }
    }

    /// A skewed working set interleaved with a one-pass scan: without any hit signal, the
    /// probation queue and the ghost keep the hot set that FIFO lets the scan flush out.
    #[test]
    fn keeps_a_skewed_working_set_through_a_scan() {
        let hot = conformance::zipf_trace(5_000, 200_000, 11);
        let trace: Vec<u64> = hot.iter().enumerate().flat_map(|(i, &p)| [p, 1_000_000 + i as u64]).collect();
        let capacity = 1_000;
        let fifo = conformance::hit_rate(Box::new(Fifo::new()), capacity, &trace);
        let s3 = conformance::hit_rate(Box::new(S3Fifo::new(capacity)), capacity, &trace);
        assert!(s3 > fifo * 1.3, "s3fifo {s3:.3} vs fifo {fifo:.3}");
    }

    /// A working set that moves: first a loop over more pages than fit (every page comes back
    /// from the ghost into main), then random reads of a new set of 70% of the capacity (redis
    /// answering GETs in hash order after a pass over other keys). Main holds the first set;
    /// unless the queues adapt, the new set cycles through a probation queue too small for
    /// it, two misses a page, until main has turned over.
    #[test]
    fn a_new_working_set_displaces_an_old_one_in_main() {
        let capacity = 1_000;
        let mut rng = 7u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let old: Vec<u64> = (0..5).flat_map(|_| 0..1_200).collect();
        let new: Vec<u64> = (0..20_000).map(|_| 1_000_000 + next() % 700).collect();
        let s3 = conformance::misses_after(Box::new(S3Fifo::new(capacity)), capacity, &old, &new);
        let fifo = conformance::misses_after(Box::new(Fifo::new()), capacity, &old, &new);
        assert!(s3 <= 700 + 700 / 5, "s3fifo: {s3} misses on a new set of 700 pages (fifo: {fifo})");
    }

    #[test]
    fn the_queues_trade_pages_by_which_ghost_a_miss_hits() {
        let mut p = S3Fifo::new(100);
        let start = p.small_target;
        p.insert(1);
        assert_eq!(p.evict(), Some(1), "probation's only page");
        p.insert(1); // back from probation's ghost: into main, probation's share grows
        let grown = p.small_target;
        assert!(grown > start, "{grown} after {start}");
        for page in 2..=3 {
            p.insert(page);
        }
        // Probation (two pages) is under its share, so main gives up page 1...
        assert_eq!(p.evict(), Some(1));
        p.insert(1); // ...which comes back from main's ghost: probation's share shrinks
        assert!(p.small_target < grown, "{} after {grown}", p.small_target);
        // Neither share leaves its bounds.
        let mut p = S3Fifo::new(100);
        p.small_target = p.max_small();
        p.insert(5);
        assert_eq!(p.evict(), Some(5));
        p.insert(5);
        assert_eq!(p.small_target, p.max_small());
        p.small_target = p.min_small();
        assert_eq!(p.evict(), Some(5), "from main: probation is empty");
        p.insert(5);
        assert_eq!(p.small_target, p.min_small());
    }

    /// A page in main that is never used again leaves once a cache's worth of one-touch pages
    /// has gone through probation, although they keep probation at its share.
    #[test]
    fn a_cold_page_in_main_leaves_under_a_stream_of_new_pages() {
        let mut p = S3Fifo::new(4);
        p.insert(0);
        assert_eq!(p.evict(), Some(0));
        p.insert(0); // from the ghost: main
        let evicted_at = (1..200u64).find(|&page| {
            p.insert(page);
            p.len() > 4 && p.evict() == Some(0)
        });
        assert!(evicted_at.is_some_and(|at| at <= 4 + 4 + 1), "page 0 left at {evicted_at:?}");
    }

    /// Probation's evictions while main is empty do not count towards main's turn: the first
    /// page to come back from the ghost is not the next to go.
    #[test]
    fn a_page_back_from_the_ghost_is_not_evicted_next() {
        let mut p = S3Fifo::new(100);
        for page in 0..200 {
            p.insert(page);
            if p.len() > 100 {
                p.evict();
            }
        }
        p.insert(50); // evicted from probation, remembered: main
        assert_ne!(p.evict(), Some(50));
        assert!(p.small_target > 10, "a miss from probation's ghost grows its share");
    }

    /// A victim that could not leave is put back as it was: neither ghost counts it.
    #[test]
    fn a_victim_put_back_is_no_miss() {
        let mut p = S3Fifo::new(100);
        for page in 0..101 {
            p.insert(page);
        }
        let victim = p.evict().expect("full");
        let target = p.small_target;
        p.put_back(victim);
        assert_eq!((p.small_target, p.len()), (target, 101));
        assert_eq!(p.evict(), Some(1), "back in probation, behind the others");
    }

    #[test]
    fn the_ghost_remembers_the_last_capacity_evictions() {
        let mut ghost = Ghost::new(100);
        for page in 0..50 {
            ghost.remember(page);
        }
        // A few may have been pushed out by a later page in the same slot; most are there.
        let found = (0..50).filter(|&p| ghost.take(p)).count();
        assert!(found >= 40, "{found} of 50 remembered");
        assert!(!ghost.take(0) && !ghost.take(49), "a page is taken once");
        assert!(!ghost.take(1 << 40), "never evicted");
        ghost.remember(7);
        for page in 1000..1099 {
            ghost.remember(page);
        }
        assert!(ghost.take(7), "kept through 99 later evictions");
        ghost.remember(7);
        for page in 2000..2100 {
            ghost.remember(page);
        }
        assert!(!ghost.take(7), "100 later evictions make it forgotten");
        let mut one = Ghost::new(1);
        one.remember(3);
        assert!(one.take(3), "a ghost of one holds the last page");
    }

    #[test]
    fn a_returning_page_skips_probation() {
        let mut p = S3Fifo::new(10);
        p.insert(1);
        assert_eq!(p.evict(), Some(1));
        p.insert(1); // back from the ghost: main queue
        for page in 2..=4 {
            p.insert(page);
        }
        // Probation is over its target, so its pages go first; 1 survives them.
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
    }
}
