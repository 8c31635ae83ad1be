//! Cache-line dirty tracking: clean twins of written pages, and the line diff that decides
//! what a write-back sends.
//!
//! When a clean page is first written, the handler keeps a copy of its clean contents (its
//! twin). At write-back it compares the page with the twin in 64-byte lines and sends only the
//! lines that changed, in one sparse frame; past a threshold of changed lines it sends the page.
//! Twins count against the local-memory limit, and the periodic flusher keeps them few: a
//! flushed page is clean again and its twin is freed.

use clustermem_proto::{LINES_PER_PAGE, LINE_SIZE, PAGE_SIZE};

/// How dirty pages are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritebackMode {
    /// Only the 64-byte lines that changed (diffed against a clean twin).
    #[default]
    Line,
    /// Whole pages (no twins): the page-granular baseline.
    Page,
}

impl std::str::FromStr for WritebackMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "line" => Ok(Self::Line),
            "page" => Ok(Self::Page),
            _ => Err(format!("unknown write-back mode {s:?} (expected line or page)")),
        }
    }
}

/// How the runtime learns which resident pages were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// Pages are installed write-protected and the first store to each faults to the handler
    /// (`UFFDIO_WRITEPROTECT`), which takes its twin and lets the writer on: exact, and the
    /// only mode with a moment to take twins, so the one line write-back needs. Costs a fault
    /// round trip through the handler thread per page per residency.
    #[default]
    Sync,
    /// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7+): the kernel resolves the first store itself and
    /// `PAGEMAP_SCAN` finds the written pages later, so stores never wait for the handler. No
    /// twin can be taken (no fault), so write-back is whole pages, and eviction moves each
    /// victim out with `UFFDIO_MOVE` (Linux 6.8+) so a racing store cannot be lost.
    Async,
}

impl std::str::FromStr for DirtyTracking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Self::Sync),
            "async" => Ok(Self::Async),
            _ => Err(format!("unknown dirty tracking {s:?} (expected sync or async)")),
        }
    }
}

impl std::fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sync => "sync",
            Self::Async => "async",
        })
    }
}

/// A page's twin: an index into the [`TwinPool`], or "the clean page was all zeros".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Twin {
    Zeros,
    Slot(u32),
}

/// Page-sized buffers for twins, reused through a free list. Past `SPARE_TWINS` free buffers
/// a released buffer is given back to the allocator: twins count against local memory only
/// while in use, so idle ones must not keep costing it.
#[derive(Debug, Default)]
pub(crate) struct TwinPool {
    slots: Vec<Box<[u8]>>,
    /// Slots with a buffer, not in use.
    free: Vec<u32>,
    /// Slots whose buffer was given back.
    hollow: Vec<u32>,
}

/// Free twin buffers kept for reuse.
const SPARE_TWINS: usize = 256;

impl TwinPool {
    /// Stores a copy of `clean` (one page), or notes that it is all zeros.
    pub(crate) fn take(&mut self, clean: &[u8]) -> Twin {
        debug_assert_eq!(clean.len(), PAGE_SIZE);
        if clean.iter().all(|&b| b == 0) {
            return Twin::Zeros;
        }
        if let Some(slot) = self.free.pop() {
            self.slots[slot as usize].copy_from_slice(clean);
            return Twin::Slot(slot);
        }
        // A new buffer is made as a copy (not zeroed, then copied over).
        let slot = match self.hollow.pop() {
            Some(slot) => {
                self.slots[slot as usize] = clean.into();
                slot
            }
            None => {
                self.slots.push(clean.into());
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 twins")
            }
        };
        Twin::Slot(slot)
    }

    /// Gives a twin's buffer back.
    pub(crate) fn release(&mut self, twin: Twin) {
        if let Twin::Slot(slot) = twin {
            if self.free.len() < SPARE_TWINS {
                self.free.push(slot);
            } else {
                self.slots[slot as usize] = Box::default();
                self.hollow.push(slot);
            }
        }
    }

    /// Twins in use (what counts against local memory).
    pub(crate) fn in_use(&self) -> usize {
        self.slots.len() - self.free.len() - self.hollow.len()
    }

    /// The clean contents a twin holds.
    pub(crate) fn clean(&self, twin: Twin) -> &[u8] {
        match twin {
            Twin::Zeros => &ZEROS,
            Twin::Slot(slot) => &self.slots[slot as usize],
        }
    }

    /// Bitmask of the lines of `page` that differ from its twin.
    pub(crate) fn diff(&self, page: &[u8], twin: Twin) -> u64 {
        diff_lines(page, self.clean(twin))
    }
}

static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Bitmask of the 64-byte lines in which `page` and `clean` differ (bit i: line i).
pub(crate) fn diff_lines(page: &[u8], clean: &[u8]) -> u64 {
    let mut mask = 0u64;
    for (i, (a, b)) in page.chunks_exact(LINE_SIZE).zip(clean.chunks_exact(LINE_SIZE)).enumerate() {
        if a != b {
            mask |= 1 << i;
        }
    }
    mask
}

/// Appends the lines of `page` named by `mask`, in ascending order.
pub(crate) fn gather_lines(page: &[u8], mask: u64, out: &mut Vec<u8>) {
    let mut m = mask;
    while m != 0 {
        let line = m.trailing_zeros() as usize;
        m &= m - 1;
        out.extend_from_slice(&page[line * LINE_SIZE..(line + 1) * LINE_SIZE]);
    }
}

/// Lines in a page, as the threshold's upper bound.
pub const MAX_LINES: u32 = LINES_PER_PAGE as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_finds_exactly_the_changed_lines() {
        let clean: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        let mut page = clean.clone();
        assert_eq!(diff_lines(&page, &clean), 0);
        page[0] ^= 1; // line 0
        page[64 * 5 + 63] ^= 1; // line 5, last byte
        page[PAGE_SIZE - 1] ^= 1; // line 63
        assert_eq!(diff_lines(&page, &clean), (1 << 0) | (1 << 5) | (1 << 63));
        let mut lines = Vec::new();
        gather_lines(&page, (1 << 5) | (1 << 63), &mut lines);
        assert_eq!(lines.len(), 2 * LINE_SIZE);
        assert_eq!(&lines[..LINE_SIZE], &page[5 * 64..6 * 64]);
        assert_eq!(&lines[LINE_SIZE..], &page[63 * 64..]);
    }

    #[test]
    fn pool_reuses_slots_and_spots_zero_pages() {
        let mut pool = TwinPool::default();
        assert_eq!(pool.take(&ZEROS), Twin::Zeros);
        assert_eq!(pool.in_use(), 0);
        let page = [7u8; PAGE_SIZE];
        let a = pool.take(&page);
        assert_eq!(pool.in_use(), 1);
        let mut written = page;
        written[100] = 0;
        assert_eq!(pool.diff(&written, a), 1 << 1);
        assert_eq!(pool.diff(&written, Twin::Zeros), u64::MAX);
        pool.release(a);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.take(&page), a, "the freed slot is reused");
    }

    #[test]
    fn idle_buffers_beyond_the_spares_are_given_back() {
        let mut pool = TwinPool::default();
        let page = [7u8; PAGE_SIZE];
        let twins: Vec<Twin> = (0..SPARE_TWINS + 10).map(|_| pool.take(&page)).collect();
        assert_eq!(pool.in_use(), SPARE_TWINS + 10);
        for t in twins {
            pool.release(t);
        }
        assert_eq!(pool.in_use(), 0);
        let held: usize = pool.slots.iter().map(|s| s.len()).sum();
        assert_eq!(held, SPARE_TWINS * PAGE_SIZE, "only the spares keep their buffers");
        let again: Vec<Twin> = (0..SPARE_TWINS + 10).map(|_| pool.take(&page)).collect();
        assert_eq!(pool.in_use(), SPARE_TWINS + 10);
        assert_eq!(pool.slots.len(), SPARE_TWINS + 10, "hollow slots are refilled, not added");
        assert!(again.iter().all(|&t| pool.diff(&page, t) == 0), "refilled buffers hold their copies");
    }
}
