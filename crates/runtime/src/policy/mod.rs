//! Eviction policies: which resident page to give back when local memory is full.
//!
//! A userspace pager sees no accessed bits: `/proc/self/pagemap` and `PAGEMAP_SCAN` do not
//! report them and idle-page tracking is usually compiled out. What it does see is every
//! miss, and every first write to a clean page (a write-protect fault). Policies therefore
//! learn from the miss stream: a page that comes back soon after it was evicted is hot.
//!
//! Duties (as foyer states them for its policies):
//! - the caller MUST `insert` a page when it becomes resident, and MUST NOT insert a page that
//!   is already tracked;
//! - the caller MUST call `remove` for a tracked page that leaves residency other than through
//!   `evict` (a region unmapped);
//! - `evict` MUST return only tracked pages and stop tracking what it returns.

mod fifo;
mod s3fifo;

pub use fifo::Fifo;
pub use s3fifo::S3Fifo;

/// A page, as policies see it: `region_id << 40 | page_index`.
pub type PageKey = u64;

/// Fibonacci hashing's multiplier (2^64 / golden ratio), shared by the policies' hashes.
pub(crate) const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

/// Hashes page numbers with one multiplication. The keys are our own page numbers (no
/// adversary to defend against), and SipHash was ~10% of the handler's time on a sequential
/// read, where every page goes through the policy's maps twice.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // The product's high bits (the table's tag) are well mixed, and its low bits (the
        // bucket) are a bijection of the key's, so adjacent pages spread.
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(FIBONACCI);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A map keyed by page number.
pub(crate) type PageMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<PageHasher>>;

/// An eviction policy over resident pages.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// A page became resident.
    fn insert(&mut self, page: PageKey);
    /// A resident page was seen in use (its first write since it was last protected).
    fn touch(&mut self, page: PageKey);
    /// Chooses a victim and stops tracking it.
    fn evict(&mut self) -> Option<PageKey>;
    /// Stops tracking a page (it left residency some other way).
    fn remove(&mut self, page: PageKey);
    /// Tracks again a page `evict` returned that could not leave after all (its move or
    /// write-protection failed). Not a miss: policies that learn from misses ignore it.
    fn put_back(&mut self, page: PageKey) {
        self.insert(page);
    }
    /// Pages tracked.
    fn len(&self) -> usize;
    /// Whether nothing is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which policy a runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// First in, first out: the baseline.
    Fifo,
    /// S3-FIFO with a ghost queue: a small probation FIFO, a main CLOCK queue, and pages that
    /// return soon after eviction admitted straight to main. The default: it keeps the hot set
    /// of skewed workloads far better than FIFO (see the `zipf` benchmark).
    #[default]
    S3Fifo,
}

impl PolicyKind {
    /// A policy of this kind for `capacity` resident pages.
    pub fn build(self, capacity: usize) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Fifo => Box::new(Fifo::new()),
            Self::S3Fifo => Box::new(S3Fifo::new(capacity)),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fifo" => Ok(Self::Fifo),
            "s3fifo" => Ok(Self::S3Fifo),
            _ => Err(format!("unknown eviction policy {s:?} (expected fifo or s3fifo)")),
        }
    }
}

/// Conformance tests every policy passes, called from one small test per policy.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use std::collections::HashSet;

    /// Random inserts, touches, removes and evictions: `evict` only returns tracked pages,
    /// each once, and `len` stays exact.
    pub fn fuzz(mut policy: Box<dyn EvictionPolicy>, seed: u64) {
        let mut rng = seed.max(1);
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut tracked = HashSet::new();
        for _ in 0..50_000 {
            let page = next() % 500;
            match next() % 4 {
                0 | 1 if !tracked.contains(&page) => {
                    policy.insert(page);
                    tracked.insert(page);
                }
                1 if tracked.contains(&page) => policy.touch(page),
                2 if tracked.contains(&page) => {
                    policy.remove(page);
                    tracked.remove(&page);
                }
                3 => match policy.evict() {
                    Some(victim) => assert!(tracked.remove(&victim), "evicted untracked page {victim}"),
                    None => assert!(tracked.is_empty()),
                },
                _ => {}
            }
            assert_eq!(policy.len(), tracked.len());
        }
        while let Some(victim) = policy.evict() {
            assert!(tracked.remove(&victim));
        }
        assert!(tracked.is_empty() && policy.is_empty());
    }

    /// Hit rate of `policy` with `capacity` pages on a trace, counting a miss as insert (and
    /// eviction when full). Hits are not shown to the policy: a pager sees none.
    pub fn hit_rate(policy: Box<dyn EvictionPolicy>, capacity: usize, trace: &[u64]) -> f64 {
        let misses = misses_after(policy, capacity, &[], trace);
        (trace.len() - misses) as f64 / trace.len() as f64
    }

    /// Misses of `policy` with `capacity` pages on `trace`, after it has seen `warm` (whose
    /// misses are not counted). Hits are not shown to the policy.
    pub fn misses_after(
        mut policy: Box<dyn EvictionPolicy>,
        capacity: usize,
        warm: &[u64],
        trace: &[u64],
    ) -> usize {
        let mut resident = HashSet::new();
        let mut misses = 0;
        for (i, &page) in warm.iter().chain(trace).enumerate() {
            if resident.contains(&page) {
                continue;
            }
            misses += usize::from(i >= warm.len());
            if resident.len() == capacity {
                let victim = policy.evict().expect("full");
                resident.remove(&victim);
            }
            policy.insert(page);
            resident.insert(page);
        }
        misses
    }

    /// A skewed trace: page `k` drawn with probability ~ 1/(k+1) over `pages` pages.
    pub fn zipf_trace(pages: u64, len: usize, seed: u64) -> Vec<u64> {
        let mut rng = seed.max(1);
        let harmonic: f64 = (1..=pages).map(|k| 1.0 / k as f64).sum();
        (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let mut u = (rng >> 11) as f64 / (1u64 << 53) as f64 * harmonic;
                let mut k = 1;
                while u > 1.0 / k as f64 && k < pages {
                    u -= 1.0 / k as f64;
                    k += 1;
                }
                // Scatter ranks over the page range so hotness is not address order.
                (k.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % pages
            })
            .collect()
    }
}
