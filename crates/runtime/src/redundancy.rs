//! How a region survives the loss of memory hosts: none, N copies of every slab, or each page
//! erasure-coded into K data and M parity shards on K+M distinct hosts.
//!
//! The erasure stripe is one page: shard `i < K` of a page is its bytes
//! `i * shard_len .. (i + 1) * shard_len` (shard_len = 4096 / K), so a read of the K data
//! shards needs no decoding, and shard slabs hold `shard_len` bytes per page, which makes the
//! hosts' memory overhead exactly (K + M) / K. The page is resident whenever it is written
//! back, so parity for the changed 64-byte lines is computed from the page itself: a sparse
//! write-back sends the changed data lines and M parity lines per changed line position,
//! all plain overwrites (idempotent, so a retried request does no harm), and never reads the
//! stripe back.

use std::fmt;
use std::str::FromStr;

use clustermem_proto::{LINE_SIZE, PAGE_SIZE};
use reed_solomon_erasure::galois_8::ReedSolomon;

/// A region's redundancy setting (`--redundancy none|replicate:N|erasure:K+M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Redundancy {
    /// One copy: a lost host loses its pages (they read as an error, never as zeros).
    #[default]
    None,
    /// Every slab on `N` distinct hosts; any copy serves a read.
    Replicate(u8),
    /// Every page split into `data` shards plus `parity` shards on distinct hosts; any `data`
    /// of them rebuild it.
    Erasure {
        /// K: shards a read needs (a power of two from 2 to 64, so a shard is whole lines).
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

    /// Shards a read needs.
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

    /// Bytes of one page held by each shard.
    pub fn shard_len(self) -> usize {
        PAGE_SIZE / self.needed()
    }
}

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

/// The Reed-Solomon code of an `erasure:K+M` region, with the page-shaped helpers the
/// handler needs.
pub(crate) struct Coder {
    rs: ReedSolomon,
    data: usize,
    parity: usize,
    shard_len: usize,
}

impl fmt::Debug for Coder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Coder({}+{})", self.data, self.parity)
    }
}

impl Coder {
    /// None unless `redundancy` is erasure coding.
    pub(crate) fn new(redundancy: Redundancy) -> Option<Self> {
        let Redundancy::Erasure { data, parity } = redundancy else { return None };
        let (data, parity) = (usize::from(data), usize::from(parity));
        let rs = ReedSolomon::new(data, parity).expect("K and M were validated when parsed");
        Some(Self { rs, data, parity, shard_len: PAGE_SIZE / data })
    }

    /// Lines of a page each shard holds.
    pub(crate) fn lines_per_shard(&self) -> usize {
        self.shard_len / LINE_SIZE
    }

    /// Computes the parity of `page` at the line positions (within a shard) set in
    /// `positions`, for every parity shard: line l of parity shard j goes to
    /// `out[(j * lines_per_shard + l) * 64..][..64]` (out holds M shards). Lines are coded
    /// independently, so a sparse write-back codes only the lines it changed.
    pub(crate) fn parity_lines(&self, page: &[u8], positions: u64, out: &mut [u8]) {
        let lps = self.lines_per_shard();
        let mut data: Vec<&[u8]> = Vec::with_capacity(self.data);
        let mut rest = positions;
        while rest != 0 {
            let l = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            data.clear();
            data.extend((0..self.data).map(|i| &page[i * self.shard_len + l * LINE_SIZE..][..LINE_SIZE]));
            let mut parity: Vec<&mut [u8]> =
                out.chunks_exact_mut(LINE_SIZE).skip(l).step_by(lps).take(self.parity).collect();
            self.rs.encode_sep(&data, &mut parity).expect("shard counts and lengths match the code");
        }
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
        assert_eq!((r.shards(), r.needed(), r.tolerates(), r.shard_len()), (6, 4, 2, 1024));
    }

    /// Any K of the K+M shards rebuild the page and the lost shards, and line-wise parity
    /// equals the parity of the whole shard (the sparse write-back relies on it).
    #[test]
    fn any_k_shards_rebuild_the_page_and_line_parity_matches() {
        let coder = Coder::new("erasure:4+2".parse().unwrap()).unwrap();
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + i / 300) as u8).collect();
        let mut shards = page.clone();
        shards.resize(6 * 1024, 0);
        coder.parity_lines(&page, u64::from(u16::MAX), &mut shards[PAGE_SIZE..]);
        // The parity of whole shards, independently.
        let data: Vec<&[u8]> = page.chunks(1024).collect();
        let mut parity = vec![vec![0u8; 1024]; 2];
        coder.rs.encode_sep(&data, &mut parity).unwrap();
        assert_eq!(shards[PAGE_SIZE..], parity.concat());
        // Some positions only: the others are left alone.
        let mut some = vec![0u8; 2 * 1024];
        coder.parity_lines(&page, 0b101, &mut some);
        for (l, line) in some.chunks(64).enumerate() {
            let coded = [0, 2, 16, 18].contains(&l);
            assert_eq!(line == &shards[PAGE_SIZE + l * 64..][..64], coded, "line {l}");
        }
        for lost_a in 0..6 {
            for lost_b in lost_a + 1..6 {
                let mut damaged = shards.clone();
                damaged[lost_a * 1024..(lost_a + 1) * 1024].fill(0xEE);
                damaged[lost_b * 1024..(lost_b + 1) * 1024].fill(0xEE);
                let present = 0b11_1111 & !(1 << lost_a) & !(1 << lost_b);
                let mut data_only = damaged.clone();
                coder.reconstruct(&mut data_only, 1024, present, false).unwrap();
                assert_eq!(data_only[..PAGE_SIZE], page, "lost shards {lost_a} and {lost_b}");
                coder.reconstruct(&mut damaged, 1024, present, true).unwrap();
                assert_eq!(damaged, shards, "every shard back, lost {lost_a} and {lost_b}");
            }
        }
        assert!(coder.reconstruct(&mut shards.clone(), 1024, 0b111, false).is_err(), "3 of 4 needed shards");
    }
}
