//! The `list-walk` workload: a singly linked list of 64-byte nodes scattered over the region in
//! a random order, walked in list order (pointer chasing: each step depends on the last load).
//!
//! Node `i` of the list sits at slot `perm(i)`, where `perm` is a keyed Feistel permutation of
//! the slots (cycle-walking onto `0..n`): nothing has to be stored to place or find a node, so
//! the fill writes the region in address order and verification recomputes the walk without
//! the region. A node holds the absolute address of the next node (0 ends the list), its
//! value, and payload to the end of its cache line.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use crate::rng::mix;
use crate::{fill_value, parallel_chunks, Ctx, Progress, WORDS_PER_PAGE};

/// u64 words per node: next address, value, payload.
pub(crate) const NODE_WORDS: usize = 8;
const NODE_BYTES: u64 = (NODE_WORDS * 8) as u64;

/// A keyed bijection of `0..n` (4-round Feistel on the next even bit width, cycle-walking).
#[derive(Debug)]
pub(crate) struct Perm {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Perm {
    pub(crate) fn new(n: u64, seed: u64) -> Self {
        assert!(n > 0, "a permutation of nothing");
        let bits = (64 - (n - 1).leading_zeros()).max(2);
        let keys = [1u64, 2, 3, 4].map(|r| mix(seed ^ r.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)));
        Self { n, half_bits: bits.div_ceil(2), keys }
    }

    fn mask(&self) -> u64 {
        (1 << self.half_bits) - 1
    }

    fn encrypt(&self, x: u64) -> u64 {
        let m = self.mask();
        let (mut l, mut r) = (x >> self.half_bits, x & m);
        for k in self.keys {
            (l, r) = (r, l ^ (mix(r ^ k) & m));
        }
        (l << self.half_bits) | r
    }

    fn decrypt(&self, x: u64) -> u64 {
        let m = self.mask();
        let (mut l, mut r) = (x >> self.half_bits, x & m);
        for k in self.keys.iter().rev() {
            (l, r) = (r ^ (mix(l ^ k) & m), l);
        }
        (l << self.half_bits) | r
    }

    /// The image of `x` (< n). The Feistel domain is under 4n, so a few steps at most.
    pub(crate) fn forward(&self, mut x: u64) -> u64 {
        loop {
            x = self.encrypt(x);
            if x < self.n {
                return x;
            }
        }
    }

    /// The `y` with `forward(y) == x`.
    pub(crate) fn inverse(&self, mut x: u64) -> u64 {
        loop {
            x = self.decrypt(x);
            if x < self.n {
                return x;
            }
        }
    }
}

/// The value node `i` (in list order) carries.
fn node_value(seed: u64, i: u64) -> u64 {
    mix(seed.rotate_left(29) ^ i.wrapping_mul(0xFF51_AFD7_ED55_8CCD))
}

/// The walk's running checksum: order-sensitive, so a walk that skips or swaps nodes fails.
fn step(sum: u64, value: u64) -> u64 {
    mix(sum ^ value)
}

/// The list over a region of `words` words at `base`.
#[derive(Debug)]
pub(crate) struct List {
    base: u64,
    nodes: u64,
    perm: Perm,
}

impl List {
    pub(crate) fn new(base: u64, words: usize, seed: u64) -> Self {
        let nodes = (words / NODE_WORDS) as u64;
        Self { base, nodes, perm: Perm::new(nodes, seed ^ 0x4C49_5354) }
    }

    pub(crate) fn nodes(&self) -> u64 {
        self.nodes
    }

    fn addr_of(&self, i: u64) -> u64 {
        self.base + self.perm.forward(i) * NODE_BYTES
    }

    /// Writes every node in address order: slot `s` holds list node `perm⁻¹(s)`.
    pub(crate) fn fill(&self, words: &[AtomicU64], seed: u64, threads: usize, progress: &Progress) {
        progress.phase("fill", words.len() as u64);
        parallel_chunks(words.len() / NODE_WORDS, threads, |slots| {
            for slot in slots {
                let i = self.perm.inverse(slot as u64);
                let next = if i + 1 < self.nodes { self.addr_of(i + 1) } else { 0 };
                let first = slot * NODE_WORDS;
                words[first].store(next, Relaxed);
                words[first + 1].store(node_value(seed, i), Relaxed);
                for (k, word) in words[first + 2..first + NODE_WORDS].iter().enumerate() {
                    word.store(fill_value(seed, first + 2 + k), Relaxed);
                }
                if first.is_multiple_of(WORDS_PER_PAGE) {
                    progress.advance(WORDS_PER_PAGE as u64);
                }
            }
        });
        // Words past the last whole node (none for whole pages) keep the standard fill.
        for (w, word) in words.iter().enumerate().skip(self.nodes as usize * NODE_WORDS) {
            word.store(fill_value(seed, w), Relaxed);
        }
    }

    /// Follows `next` from the head for `ops` nodes (or to the end): (nodes seen, checksum).
    /// A pointer outside the region or off a node boundary is an error, not a crash.
    pub(crate) fn walk(&self, words: &[AtomicU64], ops: u64) -> Result<(u64, u64), String> {
        let (mut addr, mut sum, mut count) = (self.addr_of(0), 0u64, 0u64);
        while addr != 0 && count < ops {
            let offset = addr.wrapping_sub(self.base);
            if offset >= self.nodes * NODE_BYTES || !offset.is_multiple_of(NODE_BYTES) {
                return Err(format!("node {count} points to {addr:#x}, not a node of the region"));
            }
            let first = usize::try_from(offset / 8).expect("within the region");
            sum = step(sum, words[first + 1].load(Relaxed));
            addr = words[first].load(Relaxed);
            count += 1;
        }
        Ok((count, sum))
    }

    /// What `walk(ops)` must return, computed without the region.
    pub(crate) fn expected(&self, seed: u64, ops: u64) -> (u64, u64) {
        let count = ops.min(self.nodes);
        (count, (0..count).fold(0, |s, i| step(s, node_value(seed, i))))
    }
}

/// The measured phase: walk, then compare with the independent computation.
pub(crate) fn list_walk(words: &[AtomicU64], ctx: &Ctx<'_>) -> Result<(), String> {
    let list = List::new(words.as_ptr() as u64, words.len(), ctx.opts.seed);
    ctx.progress.phase("list-walk", 1);
    let walked = list.walk(words, ctx.ops);
    ctx.progress.advance(1);
    (ctx.end)();
    let (count, sum) = walked?;
    let (want_count, want_sum) = list.expected(ctx.opts.seed, ctx.ops);
    if (count, sum) == (want_count, want_sum) {
        Ok(())
    } else {
        Err(format!("walked {count} nodes, checksum {sum:#x}; expected {want_count} nodes, {want_sum:#x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_is_a_bijection_with_an_inverse() {
        for n in [1u64, 2, 3, 5, 64, 1000, 4097] {
            let p = Perm::new(n, 7);
            let mut images: Vec<u64> = (0..n).map(|x| p.forward(x)).collect();
            for (x, &y) in images.iter().enumerate() {
                assert_eq!(p.inverse(y), x as u64, "n={n} x={x}");
            }
            images.sort_unstable();
            assert_eq!(images, (0..n).collect::<Vec<_>>(), "n={n}");
        }
    }

    #[test]
    fn consecutive_nodes_are_scattered_not_strided() {
        // A stride prefetcher must not be able to follow the list: successive deltas vary.
        let p = Perm::new(1 << 16, 1);
        let deltas: std::collections::HashSet<i64> =
            (0..100).map(|i| p.forward(i + 1) as i64 - p.forward(i) as i64).collect();
        assert!(deltas.len() > 90, "{} distinct deltas", deltas.len());
    }

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn walk_visits_every_node_and_matches_the_independent_checksum() {
        let w = words(4 * WORDS_PER_PAGE);
        let list = List::new(w.as_ptr() as u64, w.len(), 3);
        list.fill(&w, 3, 2, &Progress::new(false));
        assert_eq!(list.walk(&w, u64::MAX), Ok(list.expected(3, u64::MAX)));
        assert_eq!(list.expected(3, u64::MAX).0, list.nodes());
        assert_eq!(list.walk(&w, 10), Ok(list.expected(3, 10)));
    }

    #[test]
    fn a_corrupted_link_is_caught() {
        let w = words(2 * WORDS_PER_PAGE);
        let list = List::new(w.as_ptr() as u64, w.len(), 5);
        list.fill(&w, 5, 1, &Progress::new(false));
        let want = list.expected(5, u64::MAX);
        // Swap the values of two nodes: every link still valid, the order-sensitive sum not.
        let (a, b) = (list.perm.forward(3) as usize * NODE_WORDS, list.perm.forward(9) as usize * NODE_WORDS);
        let (va, vb) = (w[a + 1].load(Relaxed), w[b + 1].load(Relaxed));
        w[a + 1].store(vb, Relaxed);
        w[b + 1].store(va, Relaxed);
        assert_ne!(list.walk(&w, u64::MAX), Ok(want));
        // A pointer out of the region is an error.
        w[a].store(12345, Relaxed);
        assert!(list.walk(&w, u64::MAX).is_err());
    }
}
