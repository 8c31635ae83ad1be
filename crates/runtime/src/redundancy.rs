//! How a region survives the loss of memory hosts: none, N copies of every slab, or pages
//! erasure-coded K+M across K+M distinct hosts.
//!
//! An erasure-coded span keeps every data page whole on one host, so a fault is one read from
//! one host, as without redundancy. The span is cut into chunks of [`CHUNK_PAGES`] pages,
//! dealt round-robin to the K data shards; page q of parity shard j codes page q of the K
//! data shards (a *stripe*). A shard's slab is thus a K-th of the span, and the hosts' memory
//! overhead is (K + M) / K. Which host plays which shard rotates by one each chunk row, so
//! every host of a span holds data and parity alike. Writing back a page sends its changed
//! lines to its data shard and their change (new XOR clean twin), times the code's
//! coefficient, to each parity shard as an XOR (`XorLines`): no read of the stripe, and
//! changes to the pages of one stripe commute.
//! Runs of adjacent pages in a chunk are adjacent on their host, so prefetches stay whole
//! reads, and a discard of whole chunk rows frees every shard's pages.

use std::fmt;
use std::str::FromStr;

use reed_solomon_erasure::galois_8::ReedSolomon;

/// A region's redundancy setting (`--redundancy none|replicate:N|erasure:K+M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Redundancy {
    /// One copy: a lost host loses its pages (they read as an error, never as zeros).
    #[default]
    None,
    /// Every slab on `N` distinct hosts; any copy serves a read.
    Replicate(u8),
    /// Pages coded `data` + `parity` across distinct hosts; any `data` of a stripe's shards
    /// rebuild it.
    Erasure {
        /// K: data shards of a stripe (a power of two from 2 to 64, so spans cut evenly).
        data: u8,
        /// M: hosts that may be lost.
        parity: u8,
    },
}

impl Redundancy {
    /// Hosts each slab is spread over.
    pub fn shards(self) -> usize {
        match self {
            Self::None => 1,
            Self::Replicate(n) => usize::from(n),
            Self::Erasure { data, parity } => usize::from(data) + usize::from(parity),
        }
    }

    /// Shards a read needs when a page's own copy is lost.
    pub fn needed(self) -> usize {
        match self {
            Self::None | Self::Replicate(_) => 1,
            Self::Erasure { data, .. } => usize::from(data),
        }
    }

    /// Hosts that may be lost without losing data.
    pub fn tolerates(self) -> usize {
        self.shards() - self.needed()
    }

    /// Pages each shard's slab holds for a span of `span_pages` pages.
    pub(crate) fn shard_pages(self, span_pages: usize) -> usize {
        match self {
            Self::Erasure { data, .. } => span_pages.div_ceil(usize::from(data) * CHUNK_PAGES) * CHUNK_PAGES,
            Self::None | Self::Replicate(_) => span_pages,
        }
    }

    /// Where page `sp` of a span lives: the shard holding it (0 for copies: each holds every
    /// page) and its page index there, which is also the page of its stripe on every shard.
    pub(crate) fn locate(self, sp: usize) -> (usize, usize) {
        match self {
            Self::Erasure { data, .. } => {
                let (chunk, k) = (sp / CHUNK_PAGES, usize::from(data));
                (chunk % k, (chunk / k) * CHUNK_PAGES + sp % CHUNK_PAGES)
            }
            Self::None | Self::Replicate(_) => (0, sp),
        }
    }

    /// The span pages stripe `q` holds data of: page q of each data shard (of each copy: q).
    /// Some may lie past the end of a short last span.
    pub(crate) fn stripe_pages(self, q: usize) -> impl Iterator<Item = usize> {
        let (k, row) = match self {
            Self::Erasure { data, .. } => (usize::from(data), q / CHUNK_PAGES),
            Self::None | Self::Replicate(_) => (1, 0),
        };
        (0..k).map(move |i| match self {
            Self::Erasure { .. } => (row * k + i) * CHUNK_PAGES + q % CHUNK_PAGES,
            Self::None | Self::Replicate(_) => q,
        })
    }

    /// The slot of a span's placement (one host each) holding code shard `code` (data shards
    /// 0..K, then parity) of `stripe`. Erasure-coded roles rotate by one slot each chunk row,
    /// so every host holds data and parity alike: reads and parity updates spread over all
    /// K+M hosts, and any lost host held data. Copies: the slot is the copy.
    pub(crate) fn slot(self, code: usize, stripe: usize) -> usize {
        match self {
            Self::Erasure { .. } => (code + stripe / CHUNK_PAGES) % self.shards(),
            Self::None | Self::Replicate(_) => code,
        }
    }

    /// The code shard slot `slot` holds for `stripe` (the inverse of [`Redundancy::slot`]).
    pub(crate) fn code(self, slot: usize, stripe: usize) -> usize {
        match self {
            Self::Erasure { .. } => {
                let n = self.shards();
                (slot + n - (stripe / CHUNK_PAGES) % n) % n
            }
            Self::None | Self::Replicate(_) => slot,
        }
    }

    /// Span pages in a stripe row, the unit a discard drops on every host as it is: K chunks
    /// of an erasure-coded span (whose parity then reads as zeros too), one page of copies.
    pub(crate) fn row_pages(self) -> usize {
        match self {
            Self::Erasure { data, .. } => usize::from(data) * CHUNK_PAGES,
            Self::None | Self::Replicate(_) => 1,
        }
    }

    /// Stripes (pages of each host's slab) in a stripe row.
    pub(crate) fn row_stripes(self) -> usize {
        match self {
            Self::Erasure { .. } => CHUNK_PAGES,
            Self::None | Self::Replicate(_) => 1,
        }
    }

    /// The stripe rows of a span of `span_pages` pages that span pages `a..b` cover whole
    /// (row r: span pages from `r * row_pages()`, stripes from `r * row_stripes()` on every
    /// host; the last row may be short).
    pub(crate) fn whole_rows(self, span_pages: usize, a: usize, b: usize) -> std::ops::Range<usize> {
        let row = self.row_pages();
        let end = if b >= span_pages { span_pages.div_ceil(row) } else { b / row };
        let start = a.div_ceil(row);
        start..end.max(start)
    }

    /// Whether span pages (or stripes) `a` and `b` lie in one chunk (chunk row), so a run
    /// from one to the other is one run on one host, with one assignment of roles.
    pub(crate) fn same_chunk(self, a: usize, b: usize) -> bool {
        matches!(self, Self::None | Self::Replicate(_)) || a / CHUNK_PAGES == b / CHUNK_PAGES
    }
}

/// Adjacent pages of an erasure-coded span kept on one host: long enough for prefetch runs
/// and discards of whole rows (K chunks), short enough to spread a span's pages over its data
/// hosts finely.
pub(crate) const CHUNK_PAGES: usize = 16;

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Replicate(n) => write!(f, "replicate:{n}"),
            Self::Erasure { data, parity } => write!(f, "erasure:{data}+{parity}"),
        }
    }
}

/// Why a `--redundancy` value is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad redundancy {given:?}: {why} (expected none, replicate:N with N >= 1, or erasure:K+M with K in 2,4,8,16,32,64 and M >= 1, K+M <= 64)")]
pub struct ParseRedundancyError {
    given: String,
    why: &'static str,
}

impl FromStr for Redundancy {
    type Err = ParseRedundancyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseRedundancyError { given: s.to_string(), why };
        if s == "none" {
            return Ok(Self::None);
        }
        if let Some(n) = s.strip_prefix("replicate:") {
            let n: u8 = n.parse().map_err(|_| err("N is not a number from 1 to 255"))?;
            return match n {
                0 => Err(err("N must be at least 1")),
                1 => Ok(Self::None),
                n => Ok(Self::Replicate(n)),
            };
        }
        if let Some(km) = s.strip_prefix("erasure:") {
            let (k, m) = km.split_once('+').ok_or_else(|| err("erasure needs K+M"))?;
            let data: u8 = k.parse().map_err(|_| err("K is not a number"))?;
            let parity: u8 = m.parse().map_err(|_| err("M is not a number"))?;
            if !data.is_power_of_two() || !(2..=64).contains(&data) {
                return Err(err(
                    "K must be a power of two from 2 to 64, so that a shard is whole 64-byte lines",
                ));
            }
            if parity == 0 {
                return Err(err("M must be at least 1"));
            }
            if usize::from(data) + usize::from(parity) > 64 {
                return Err(err("K+M must be at most 64"));
            }
            return Ok(Self::Erasure { data, parity });
        }
        Err(err("unknown kind"))
    }
}

/// The Reed-Solomon code of an `erasure:K+M` region.
pub(crate) struct Coder {
    rs: ReedSolomon,
    parity: usize,
}

impl fmt::Debug for Coder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Coder({}+{})", self.rs.data_shard_count(), self.parity)
    }
}

impl Coder {
    /// None unless `redundancy` is erasure coding.
    pub(crate) fn new(redundancy: Redundancy) -> Option<Self> {
        let Redundancy::Erasure { data, parity } = redundancy else { return None };
        let (data, parity) = (usize::from(data), usize::from(parity));
        let rs = ReedSolomon::new(data, parity).expect("K and M were validated when parsed");
        Some(Self { rs, parity })
    }

    /// The change to every parity shard when data shard `shard` changes by `delta` (new XOR
    /// old, any length): parity j changes by `out[j * len..][..len]` (out holds M of them).
    /// The code is linear, so this is all a parity shard needs to follow a sparse write.
    pub(crate) fn parity_delta(&self, shard: usize, delta: &[u8], out: &mut [u8]) {
        let len = delta.len();
        debug_assert_eq!(out.len(), self.parity * len);
        // From zeros, coding one data shard leaves exactly its term in each parity shard.
        out.fill(0);
        let mut parity: Vec<&mut [u8]> = out.chunks_exact_mut(len.max(1)).collect();
        self.rs
            .encode_single_sep(shard, delta, &mut parity)
            .expect("shard counts and lengths match the code");
    }

    /// Fills in the missing data shards (and, with `parity`, the missing parity shards) of
    /// `shards`: K + M shards of `len` bytes each, those with bit i of `present` set hold
    /// shard i. Needs K present. Shards may span many pages: the code works byte by byte.
    pub(crate) fn reconstruct(
        &self,
        shards: &mut [u8],
        len: usize,
        present: u64,
        parity: bool,
    ) -> Result<(), String> {
        let mut parts: Vec<(&mut [u8], bool)> =
            shards.chunks_exact_mut(len).enumerate().map(|(i, s)| (s, present & (1 << i) != 0)).collect();
        let result =
            if parity { self.rs.reconstruct(&mut parts) } else { self.rs.reconstruct_data(&mut parts) };
        result.map_err(|e| format!("erasure decode failed: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermem_proto::{LINE_SIZE, PAGE_SIZE};

    #[test]
    fn parses_and_prints_every_kind() {
        for s in ["none", "replicate:2", "replicate:3", "erasure:2+1", "erasure:4+2", "erasure:8+2"] {
            assert_eq!(s.parse::<Redundancy>().unwrap().to_string(), s);
        }
        assert_eq!("replicate:1".parse::<Redundancy>().unwrap(), Redundancy::None);
        for bad in ["", "replicate:0", "replicate:x", "erasure:3+1", "erasure:4+0", "erasure:4", "mirror"] {
            let e = bad.parse::<Redundancy>().unwrap_err().to_string();
            assert!(e.contains("expected none"), "{bad}: {e}");
        }
        let r: Redundancy = "erasure:4+2".parse().unwrap();
        assert_eq!((r.shards(), r.needed(), r.tolerates()), (6, 4, 2));
    }

    /// Every page of a span has exactly one place, the stripes partition the data pages, runs
    /// in a chunk are runs on their host, and slabs hold a K-th of the span.
    #[test]
    fn erasure_layout_places_every_page_once() {
        let r: Redundancy = "erasure:4+2".parse().unwrap();
        let span = 1000; // not a multiple of K * CHUNK_PAGES: a short last span
        let shard_pages = r.shard_pages(span);
        assert_eq!(shard_pages, 256);
        let mut seen = std::collections::HashSet::new();
        for sp in 0..span {
            let (shard, q) = r.locate(sp);
            assert!(shard < 4 && q < shard_pages, "page {sp} at {shard}/{q}");
            assert!(seen.insert((shard, q)), "page {sp} shares {shard}/{q}");
            assert_eq!(r.stripe_pages(q).nth(shard), Some(sp), "stripe {q} names page {sp}");
            if sp > 0 && r.same_chunk(sp - 1, sp) {
                assert_eq!(r.locate(sp - 1), (shard, q - 1), "a chunk is a run on one host");
            }
        }
        assert_eq!(r.locate(16), (1, 0), "chunks are dealt round-robin");
        assert_eq!(r.locate(64), (0, 16));
        for stripe in [0, 15, 16, 100, 255] {
            let slots: std::collections::HashSet<usize> = (0..6).map(|c| r.slot(c, stripe)).collect();
            assert_eq!(slots.len(), 6, "one slot per code shard in stripe {stripe}");
            assert!((0..6).all(|c| r.code(r.slot(c, stripe), stripe) == c));
        }
        assert_eq!((r.slot(0, 0), r.slot(0, 16), r.slot(5, 16)), (0, 1, 0), "roles rotate by row");
        let none = Redundancy::None;
        assert_eq!((none.shard_pages(span), none.locate(77)), (span, (0, 77)));
        // Rows of 64 pages; the last of a 1000-page span is short (960..1000).
        assert_eq!(r.whole_rows(span, 64, 192), 1..3);
        assert_eq!(r.whole_rows(span, 65, 191), 2..2, "no whole row");
        assert_eq!(r.whole_rows(span, 900, 1000), 15..16, "the short last row, to the end");
        assert_eq!(r.whole_rows(span, 960, 999), 15..15, "not quite to the end");
        assert_eq!(r.whole_rows(span, 100, 10), 2..2, "empty, never reversed");
        assert_eq!((none.whole_rows(span, 5, 9), none.row_stripes()), (5..9, 1));
        assert!(none.same_chunk(15, 16) && !r.same_chunk(15, 16));
    }

    /// A parity page kept up to date by XORing in the coded change of each data page (as the
    /// hosts do with `XorLines`) equals the parity of the stripe coded afresh, and any K of
    /// the K+M pages rebuild the others.
    #[test]
    fn parity_follows_sparse_changes_and_any_k_rebuild() {
        let coder = Coder::new("erasure:4+2".parse().unwrap()).unwrap();
        let page = |seed: usize| -> Vec<u8> {
            (0..PAGE_SIZE).map(|i| (i * 7 + i / 300 + seed * 31) as u8).collect()
        };
        let mut data: Vec<Vec<u8>> = (0..4).map(page).collect();
        let encode = |data: &[Vec<u8>]| {
            let mut parity = vec![vec![0u8; PAGE_SIZE]; 2];
            coder.rs.encode_sep(data, &mut parity).unwrap();
            parity
        };
        let mut parity = encode(&data);
        // Sparse changes to two data pages, several times, applied as deltas.
        for (round, (shard, line)) in [(1, 3), (3, 63), (1, 3), (0, 10)].into_iter().enumerate() {
            let new: Vec<u8> = (0..LINE_SIZE).map(|b| (b * 13 + round * 101) as u8).collect();
            let at = line * LINE_SIZE;
            let delta: Vec<u8> =
                new.iter().zip(&data[shard][at..at + LINE_SIZE]).map(|(a, b)| a ^ b).collect();
            let mut out = vec![0u8; 2 * LINE_SIZE];
            coder.parity_delta(shard, &delta, &mut out);
            for (j, change) in out.chunks(LINE_SIZE).enumerate() {
                parity[j][at..at + LINE_SIZE].iter_mut().zip(change).for_each(|(p, c)| *p ^= c);
            }
            data[shard][at..at + LINE_SIZE].copy_from_slice(&new);
        }
        assert_eq!(parity, encode(&data), "the deltas kept parity exact");
        let stripe: Vec<u8> = data.iter().chain(&parity).flatten().copied().collect();
        for lost_a in 0..6 {
            for lost_b in lost_a + 1..6 {
                let mut damaged = stripe.clone();
                damaged[lost_a * PAGE_SIZE..(lost_a + 1) * PAGE_SIZE].fill(0xEE);
                damaged[lost_b * PAGE_SIZE..(lost_b + 1) * PAGE_SIZE].fill(0xEE);
                let present = 0b11_1111 & !(1 << lost_a) & !(1 << lost_b);
                coder.reconstruct(&mut damaged, PAGE_SIZE, present, true).unwrap();
                assert_eq!(damaged, stripe, "lost {lost_a} and {lost_b}");
            }
        }
        assert!(coder.reconstruct(&mut stripe.clone(), PAGE_SIZE, 0b111, false).is_err(), "3 of 4 needed");
    }
}
