//! The `bfs` workload: breadth-first search over an RMAT graph (a = 0.57, b = c = 0.19, as in
//! Graph500) stored in the region in CSR form: `V + 1` edge offsets, then the edges' target
//! vertices, one u64 word each.
//!
//! The graph is generated source by source, so the fill streams through the region in address
//! order: a vertex's out-degree is its RMAT expectation (the product of the row probabilities
//! of its id's bits) dithered to an integer, and each edge's target is drawn bit by bit from
//! the column probabilities given the source's bits, which is RMAT's distribution conditioned
//! on the source. Everything about vertex `v` comes from a generator seeded by `v`, so the
//! reference search regenerates adjacency lists without the region or a copy of the graph.
//! Vertex ids are scrambled by a bijection so the hubs are not neighbours in memory.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use crate::list::Perm;
use crate::rng::{mix, Rng};
use crate::{fill_value, Ctx, Progress};

/// RMAT quadrant probabilities: a (0,0), b (0,1), c (1,0); d (1,1) is the rest.
const A: f64 = 0.57;
const B: f64 = 0.19;
const C: f64 = 0.19;
/// Target mean out-degree when sizing the vertex count.
const MIN_DEGREE: usize = 16;
/// Level of a vertex the search did not reach.
pub(crate) const UNREACHED: u32 = u32::MAX;

/// The graph a region of a given size holds.
#[derive(Debug)]
pub(crate) struct Rmat {
    scale: u32,
    vertices: u64,
    /// Words available for edges.
    edge_capacity: u64,
    /// Sum of the expected degrees.
    target_edges: f64,
    labels: Perm,
    seed: u64,
}

impl Rmat {
    /// The largest power-of-two vertex count with room for `MIN_DEGREE` edges a vertex, or
    /// None when `words` is too small for a graph of 4 vertices.
    pub(crate) fn for_words(words: usize, seed: u64) -> Option<Self> {
        let max_vertices = (words.checked_sub(1)? / (MIN_DEGREE + 1)) as u64;
        if max_vertices < 4 {
            return None;
        }
        let scale = 63 - max_vertices.leading_zeros();
        let vertices = 1u64 << scale;
        let edge_capacity = words as u64 - vertices - 1;
        Some(Self {
            scale,
            vertices,
            edge_capacity,
            // A little under capacity: the dithered degrees rarely hit the clamp.
            target_edges: edge_capacity as f64 * 0.97,
            labels: Perm::new(vertices, seed ^ 0x524D_4154),
            seed,
        })
    }

    /// The search starts at the biggest hub.
    pub(crate) fn source(&self) -> u64 {
        self.labels.forward(0)
    }

    /// Calls `edge(target)` for each out-edge of (scrambled) vertex `v`, stopping after
    /// `max` edges. Returns the edges produced.
    pub(crate) fn edges(&self, v: u64, max: u64, mut edge: impl FnMut(u64)) -> u64 {
        let raw = self.labels.inverse(v);
        let mut rng = Rng::new(self.seed ^ mix(raw ^ 0x4544_4745));
        let ones = raw.count_ones() as i32;
        let expected = self.target_edges * (A + B).powi(self.scale as i32 - ones) * (1.0 - A - B).powi(ones);
        let degree = ((expected + rng.unit()) as u64).min(max);
        // Column bit 0 with probability a/(a+b) under a 0 row bit, c/(c+d) under a 1, in 16 bits.
        let zero_below = [(A / (A + B) * 65536.0) as u64, (C / (1.0 - A - B) * 65536.0) as u64];
        for _ in 0..degree {
            let (mut target, mut bits, mut left) = (0u64, 0u64, 0u32);
            for level in (0..self.scale).rev() {
                if left == 0 {
                    (bits, left) = (rng.next_u64(), 4);
                }
                let row = (raw >> level) & 1;
                let column = u64::from(bits & 0xFFFF >= zero_below[row as usize]);
                target = (target << 1) | column;
                bits >>= 16;
                left -= 1;
            }
            edge(self.labels.forward(target));
        }
        degree
    }

    /// CSR offsets computed without the region: vertex `v`'s edges are `[off[v], off[v+1])`.
    pub(crate) fn offsets(&self) -> Vec<u64> {
        let mut offsets = Vec::with_capacity(self.vertices as usize + 1);
        let mut next = 0u64;
        for v in 0..self.vertices {
            offsets.push(next);
            next += self.edges(v, self.edge_capacity - next, |_| {});
        }
        offsets.push(next);
        offsets
    }

    /// Writes offsets (words `0..=V`) and edges (from word `V+1`) in address order, and the
    /// standard fill past the last edge.
    pub(crate) fn fill(&self, words: &[AtomicU64], progress: &Progress) {
        progress.phase("fill", words.len() as u64);
        let edge_base = self.vertices as usize + 1;
        let mut next = 0u64;
        let mut written = 0usize;
        for v in 0..self.vertices {
            words[v as usize].store(next, Relaxed);
            let degree = self.edges(v, self.edge_capacity - next, |target| {
                words[edge_base + written].store(target, Relaxed);
                written += 1;
            });
            next += degree;
            progress.advance(1 + degree);
        }
        words[self.vertices as usize].store(next, Relaxed);
        for (w, word) in words.iter().enumerate().skip(edge_base + written) {
            word.store(fill_value(self.seed, w), Relaxed);
        }
    }
}

/// Breadth-first levels from `source`, reading the graph through `adjacent(v, visit)`.
/// Returns the levels and the edges scanned.
pub(crate) fn bfs(
    vertices: u64,
    source: u64,
    mut adjacent: impl FnMut(u64, &mut dyn FnMut(u64)) -> Result<(), String>,
) -> Result<(Vec<u32>, u64), String> {
    let mut level = vec![UNREACHED; usize::try_from(vertices).expect("fits")];
    let mut queue = std::collections::VecDeque::from([source]);
    level[source as usize] = 0;
    let mut scanned = 0u64;
    while let Some(v) = queue.pop_front() {
        let next = level[v as usize] + 1;
        let mut bad = None;
        adjacent(v, &mut |w| {
            scanned += 1;
            match level.get_mut(w as usize) {
                Some(l) if *l == UNREACHED => {
                    *l = next;
                    queue.push_back(w);
                }
                Some(_) => {}
                None => bad = Some(w),
            }
        })?;
        if let Some(w) = bad {
            return Err(format!("vertex {v} has an edge to {w}, past the {vertices} vertices"));
        }
    }
    Ok((level, scanned))
}

/// The search over the region's CSR graph.
pub(crate) fn bfs_region(words: &[AtomicU64], g: &Rmat) -> Result<(Vec<u32>, u64), String> {
    let edge_base = g.vertices as usize + 1;
    bfs(g.vertices, g.source(), |v, visit| {
        let (start, end) = (words[v as usize].load(Relaxed), words[v as usize + 1].load(Relaxed));
        if start > end || end > g.edge_capacity {
            return Err(format!("vertex {v}: bad edge range {start}..{end}"));
        }
        for e in start..end {
            visit(words[edge_base + e as usize].load(Relaxed));
        }
        Ok(())
    })
}

/// The measured phase: one search over the region, then the reference search over adjacency
/// regenerated from the seed, level by level.
pub(crate) fn run(words: &[AtomicU64], ctx: &Ctx<'_>) -> Result<u64, String> {
    let g = Rmat::for_words(words.len(), ctx.opts.seed).ok_or("--size too small for a graph")?;
    ctx.progress.phase("bfs", 1);
    let got = bfs_region(words, &g);
    ctx.progress.advance(1);
    (ctx.end)();
    let (levels, scanned) = got?;
    let offsets = g.offsets();
    let (want, _) = bfs(g.vertices, g.source(), |v, visit| {
        let room = offsets[v as usize + 1] - offsets[v as usize];
        g.edges(v, room, &mut *visit);
        Ok(())
    })?;
    let reached = levels.iter().filter(|&&l| l != UNREACHED).count();
    let want_reached = want.iter().filter(|&&l| l != UNREACHED).count();
    if let Some(v) = (0..levels.len()).find(|&v| levels[v] != want[v]) {
        return Err(format!(
            "vertex {v} at level {}, expected {} ({reached} reached, expected {want_reached})",
            levels[v], want[v]
        ));
    }
    Ok(scanned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WORDS_PER_PAGE;

    fn region(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn graph_fits_and_is_skewed() {
        let words = 256 * WORDS_PER_PAGE;
        let g = Rmat::for_words(words, 1).unwrap();
        let off = g.offsets();
        let edges = *off.last().unwrap();
        assert!(
            edges <= g.edge_capacity && edges > g.edge_capacity * 9 / 10,
            "{edges} of {}",
            g.edge_capacity
        );
        let mut degrees: Vec<u64> = off.windows(2).map(|w| w[1] - w[0]).collect();
        degrees.sort_unstable();
        let max = *degrees.last().unwrap();
        let median = degrees[degrees.len() / 2];
        assert!(max > 20 * median.max(1), "max {max}, median {median}: RMAT degrees are skewed");
        // The source is the biggest hub.
        assert_eq!(off[g.source() as usize + 1] - off[g.source() as usize], max);
    }

    #[test]
    fn search_over_the_filled_region_matches_the_reference() {
        let w = region(64 * WORDS_PER_PAGE);
        let g = Rmat::for_words(w.len(), 9).unwrap();
        g.fill(&w, &Progress::new(false));
        let offsets = g.offsets();
        for v in 0..=g.vertices as usize {
            assert_eq!(w[v].load(Relaxed), offsets[v], "offset {v}");
        }
        let (levels, scanned) = bfs_region(&w, &g).unwrap();
        let (want, want_scanned) = bfs(g.vertices, g.source(), |v, visit| {
            g.edges(v, offsets[v as usize + 1] - offsets[v as usize], &mut *visit);
            Ok(())
        })
        .unwrap();
        assert_eq!(levels, want);
        assert_eq!(scanned, want_scanned);
        let reached = levels.iter().filter(|&&l| l != UNREACHED).count();
        assert!(reached > g.vertices as usize / 4, "{reached} of {} reached", g.vertices);
        assert!(levels.iter().any(|&l| l >= 2), "a search deeper than the hub's neighbours");
    }

    #[test]
    fn a_corrupted_edge_changes_the_levels() {
        let w = region(16 * WORDS_PER_PAGE);
        let g = Rmat::for_words(w.len(), 2).unwrap();
        g.fill(&w, &Progress::new(false));
        let (levels, _) = bfs_region(&w, &g).unwrap();
        // Point the source's first edge at an unreached vertex (or, failing that, out of range).
        let target = levels.iter().position(|&l| l == UNREACHED).map_or(u64::MAX, |v| v as u64);
        let first_edge = g.vertices as usize + 1 + w[g.source() as usize].load(Relaxed) as usize;
        w[first_edge].store(target, Relaxed);
        match bfs_region(&w, &g) {
            Ok((changed, _)) => assert_ne!(changed, levels),
            Err(e) => assert!(e.contains("past the"), "{e}"),
        }
    }
}
