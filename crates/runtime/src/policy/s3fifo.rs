//! S3-FIFO (Yang et al., SOSP'23) adapted to a pager that sees misses, not hits.
//!
//! New pages enter a small probation FIFO. A page leaving probation unused goes to a ghost
//! queue (its key only); if it faults again while still remembered there, it was evicted too
//! early and is admitted straight to the main queue. The main queue is a CLOCK: a page seen in
//! use (a write fault) since the hand last passed gets another round. One-touch pages of a
//! scan thus never displace the hot set, which lives in main.

use std::collections::VecDeque;

use super::{EvictionPolicy, PageKey, PageMap};

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
    small_target: usize,
    ghost_capacity: usize,
    entries: PageMap<PageKey, Entry>,
    small: VecDeque<(PageKey, u64)>,
    main: VecDeque<(PageKey, u64)>,
    small_len: usize,
    ghost: VecDeque<(PageKey, u64)>,
    ghost_live: PageMap<PageKey, u64>,
    next_generation: u64,
}

impl S3Fifo {
    /// A policy for `capacity` resident pages: 10% probation, a ghost as large as the cache.
    pub fn new(capacity: usize) -> Self {
        Self {
            small_target: (capacity / 10).max(1),
            ghost_capacity: capacity.max(1),
            entries: PageMap::default(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_len: 0,
            ghost: VecDeque::new(),
            ghost_live: PageMap::default(),
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

    fn remember(&mut self, page: PageKey) {
        self.next_generation += 1;
        self.ghost_live.insert(page, self.next_generation);
        self.ghost.push_back((page, self.next_generation));
        while self.ghost_live.len() > self.ghost_capacity {
            let Some((old, generation)) = self.ghost.pop_front() else { break };
            if self.ghost_live.get(&old) == Some(&generation) {
                self.ghost_live.remove(&old);
            }
        }
    }

    /// Pops the next live slot of `queue`.
    fn pop_live(&mut self, queue: Queue) -> Option<(PageKey, Entry)> {
        loop {
            let (page, generation) = match queue {
                Queue::Small => self.small.pop_front()?,
                Queue::Main => self.main.pop_front()?,
            };
            match self.entries.get(&page) {
                Some(e) if e.generation == generation && e.queue == queue => {
                    if queue == Queue::Small {
                        self.small_len -= 1;
                    }
                    return Some((page, *e));
                }
                _ => {}
            }
        }
    }

    fn evict_small(&mut self) -> Option<PageKey> {
        while let Some((page, entry)) = self.pop_live(Queue::Small) {
            if entry.freq > 0 {
                self.push(page, Queue::Main, 0);
            } else {
                self.entries.remove(&page);
                self.remember(page);
                return Some(page);
            }
        }
        None
    }

    fn evict_main(&mut self) -> Option<PageKey> {
        while let Some((page, entry)) = self.pop_live(Queue::Main) {
            if entry.freq > 0 {
                self.push(page, Queue::Main, entry.freq - 1);
            } else {
                self.entries.remove(&page);
                return Some(page);
            }
        }
        None
    }
}

impl EvictionPolicy for S3Fifo {
    fn insert(&mut self, page: PageKey) {
        if self.ghost_live.remove(&page).is_some() {
            self.push(page, Queue::Main, 0);
        } else {
            self.push(page, Queue::Small, 0);
        }
    }

    fn touch(&mut self, page: PageKey) {
        if let Some(e) = self.entries.get_mut(&page) {
            e.freq = (e.freq + 1).min(3);
        }
    }

    fn evict(&mut self) -> Option<PageKey> {
        if self.small_len >= self.small_target || self.main.is_empty() {
            if let Some(page) = self.evict_small() {
                return Some(page);
            }
        }
        self.evict_main().or_else(|| self.evict_small())
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
