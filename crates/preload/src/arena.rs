//! Address-space bookkeeping of the arena: which byte ranges are free. Offsets are relative
//! to the arena's start and whole pages; every free range reads as zeros (a range is
//! discarded before it is released), so handing one out needs no clearing.

use std::collections::BTreeMap;

/// Free ranges of an arena, kept disjoint and never adjacent (merged on release).
#[derive(Debug)]
pub(crate) struct Arena {
    /// start -> end of each free range.
    free: BTreeMap<usize, usize>,
}

impl Arena {
    /// An arena of `len` bytes, all free.
    pub(crate) fn new(len: usize) -> Self {
        Self { free: BTreeMap::from([(0, len)]) }
    }

    /// Takes the first free range of `len` bytes whose start is a multiple of `align` (a power
    /// of two), or `None` when no free range is large enough.
    pub(crate) fn alloc(&mut self, len: usize, align: usize) -> Option<usize> {
        let start = self.free.iter().find_map(|(&s, &e)| {
            let aligned = s.checked_add(align - 1)? & !(align - 1);
            (aligned.checked_add(len)? <= e).then_some(aligned)
        })?;
        let taken = self.take(start, len);
        debug_assert!(taken, "found free above");
        Some(start)
    }

    /// Takes `start..start + len` if all of it is free (to grow an allocation in place).
    pub(crate) fn take(&mut self, start: usize, len: usize) -> bool {
        let end = start + len;
        let Some((&s, &e)) = self.free.range(..=start).next_back() else { return false };
        if e < end {
            return false;
        }
        self.free.remove(&s);
        if s < start {
            self.free.insert(s, start);
        }
        if end < e {
            self.free.insert(end, e);
        }
        true
    }

    /// Returns `start..start + len` to the free ranges. Parts already free are fine (a program
    /// may unmap a range twice), so this is a union.
    pub(crate) fn release(&mut self, start: usize, len: usize) {
        let (mut s, mut e) = (start, start + len);
        let touching: Vec<(usize, usize)> =
            self.free.range(..=e).rev().take_while(|&(_, &end)| end >= s).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in touching {
            self.free.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        self.free.insert(s, e);
    }

    /// Bytes free in total.
    #[cfg(test)]
    fn free_bytes(&self) -> usize {
        self.free.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 4096;

    #[test]
    fn first_fit_and_merge_on_release() {
        let mut a = Arena::new(16 * P);
        let x = a.alloc(4 * P, P).unwrap();
        let y = a.alloc(4 * P, P).unwrap();
        let z = a.alloc(4 * P, P).unwrap();
        assert_eq!((x, y, z), (0, 4 * P, 8 * P));
        assert_eq!(a.alloc(5 * P, P), None, "only 4 pages left");
        a.release(y, 4 * P);
        assert_eq!(a.alloc(2 * P, P), Some(4 * P), "the hole is reused first");
        a.release(4 * P, 2 * P);
        a.release(x, 4 * P);
        a.release(z, 4 * P);
        assert_eq!(a.free_bytes(), 16 * P);
        assert_eq!(a.alloc(16 * P, P), Some(0), "everything merged back into one range");
    }

    #[test]
    fn releasing_free_or_overlapping_ranges_is_a_union() {
        let mut a = Arena::new(16 * P);
        a.alloc(16 * P, P).unwrap();
        a.release(2 * P, 4 * P);
        a.release(2 * P, 4 * P);
        a.release(4 * P, 4 * P);
        assert_eq!(a.free_bytes(), 6 * P);
        assert_eq!(a.alloc(6 * P, P), Some(2 * P));
    }

    #[test]
    fn partial_release_splits_and_take_grows_in_place() {
        let mut a = Arena::new(16 * P);
        let x = a.alloc(8 * P, P).unwrap();
        a.release(x + 2 * P, 2 * P); // a hole in the middle, as munmap of part of a mapping
        assert!(a.take(x + 2 * P, 2 * P), "the hole can be taken back");
        assert!(!a.take(x + 6 * P, 4 * P), "not all free");
        assert!(a.take(x + 8 * P, 4 * P), "the range after is free");
        assert_eq!(a.free_bytes(), 4 * P);
    }

    #[test]
    fn aligned_allocations_leave_the_slack_free() {
        let mut a = Arena::new(64 * P);
        a.alloc(P, P).unwrap();
        let x = a.alloc(4 * P, 16 * P).unwrap();
        assert_eq!(x, 16 * P);
        assert_eq!(a.alloc(15 * P, P), Some(P), "the gap before the aligned block is free");
    }
}
