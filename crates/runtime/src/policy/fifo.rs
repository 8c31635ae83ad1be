//! First in, first out: evicts the page resident longest. The baseline other policies beat.

use std::collections::{HashSet, VecDeque};

use super::{EvictionPolicy, PageKey};

/// FIFO over resident pages; removal is lazy (a removed page is skipped when it surfaces).
#[derive(Debug, Default)]
pub struct Fifo {
    queue: VecDeque<PageKey>,
    live: HashSet<PageKey>,
}

impl Fifo {
    /// An empty FIFO.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EvictionPolicy for Fifo {
    fn insert(&mut self, page: PageKey) {
        self.live.insert(page);
        self.queue.push_back(page);
    }
    fn touch(&mut self, _page: PageKey) {}
    fn evict(&mut self) -> Option<PageKey> {
        while let Some(page) = self.queue.pop_front() {
            if self.live.remove(&page) {
                return Some(page);
            }
        }
        None
    }
    fn remove(&mut self, page: PageKey) {
        self.live.remove(&page);
        if self.queue.len() > 2 * self.live.len() + 64 {
            self.queue.retain(|p| self.live.contains(p));
        }
    }
    fn len(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::conformance;

    #[test]
    fn conforms() {
        conformance::fuzz(Box::new(Fifo::new()), 7);
    }

    #[test]
    fn evicts_in_insertion_order() {
        let mut f = Fifo::new();
        for p in [3, 1, 2] {
            f.insert(p);
        }
        f.remove(1);
        assert_eq!(f.evict(), Some(3));
        assert_eq!(f.evict(), Some(2));
        assert_eq!(f.evict(), None);
    }
}
