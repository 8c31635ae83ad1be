//! Miss-stream prefetching: find the trend in a region's recent faults and fetch ahead of it.
//!
//! The detector keeps the deltas between the last few missing pages and looks for a majority
//! delta with Boyer-Moore voting (as Leap does): a sequential or strided stream has one, even
//! with some noise mixed in; a random stream has none and gets no prefetch at all. The depth
//! doubles each time the stream runs off the end of what was prefetched (every prefetched page
//! was needed) and falls back to the minimum when the trend breaks.
//!
//! Pointer mode adds content-directed prefetch for linked structures, which have no trend to
//! find: see `Core::follow_pointers` in `handler.rs`.

/// Deltas remembered per region.
const HISTORY: usize = 8;
/// Prefetch depth bounds, in pages.
pub(crate) const MIN_DEPTH: usize = 4;
const MAX_DEPTH: usize = 256;

/// Whether the runtime prefetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchMode {
    /// Never fetch a page before it faults.
    Off,
    /// Follow sequential and strided miss streams (default).
    #[default]
    Auto,
    /// As `Auto`, and follow pointers: when a page arrives for a fault, the 8-byte values
    /// near the faulting address that point into the region have their pages fetched too,
    /// and so on from those pages (a chain of bounded depth), each abandoned if it misses
    /// its deadline.
    Pointer,
}

impl PrefetchMode {
    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Auto => "auto",
            Self::Pointer => "pointer",
        }
    }
}

impl std::str::FromStr for PrefetchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "pointer" => Ok(Self::Pointer),
            _ => Err(format!("unknown prefetch mode {s:?} (expected off, auto or pointer)")),
        }
    }
}

/// What to prefetch after a miss: `depth` pages at `start + k * delta`, k = 1..=depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prediction {
    pub delta: i64,
    pub depth: usize,
    /// The miss landed exactly past the previous prefetch window: all of it was used.
    pub window_consumed: bool,
}

/// The miss-stream state of one region.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    deltas: [i64; HISTORY],
    filled: usize,
    next: usize,
    last: Option<usize>,
    depth: usize,
    /// The page just past the last prefetch window.
    window_end: Option<usize>,
}

impl Stream {
    /// Records a miss at `page` and says what to prefetch, if anything.
    pub(crate) fn on_miss(&mut self, page: usize) -> Option<Prediction> {
        let window_consumed = self.window_end == Some(page);
        if let Some(last) = self.last {
            let delta = page as i64 - last as i64;
            self.deltas[self.next] = delta;
            self.next = (self.next + 1) % HISTORY;
            self.filled = (self.filled + 1).min(HISTORY);
        }
        self.last = Some(page);
        let Some(delta) = self.majority() else {
            self.depth = MIN_DEPTH;
            self.window_end = None;
            return None;
        };
        self.depth = if window_consumed {
            (self.depth * 2).clamp(MIN_DEPTH, MAX_DEPTH)
        } else {
            self.depth.max(MIN_DEPTH)
        };
        self.window_end = usize::try_from(page as i64 + delta * (self.depth as i64 + 1)).ok();
        Some(Prediction { delta, depth: self.depth, window_consumed })
    }

    /// The delta held by more than half of the remembered deltas (at least two), if any.
    fn majority(&self) -> Option<i64> {
        let deltas = &self.deltas[..self.filled];
        let (mut candidate, mut votes) = (0i64, 0usize);
        for &d in deltas {
            if votes == 0 {
                candidate = d;
                votes = 1;
            } else if d == candidate {
                votes += 1;
            } else {
                votes -= 1;
            }
        }
        let count = deltas.iter().filter(|&&d| d == candidate).count();
        (count >= 2 && count * 2 > deltas.len() && candidate != 0).then_some(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_stream_is_followed_and_depth_grows_while_consumed() {
        let mut s = Stream::default();
        assert_eq!(s.on_miss(10), None);
        assert_eq!(s.on_miss(11), None, "one delta is not a trend");
        let p = s.on_miss(12).expect("two equal deltas are");
        assert_eq!((p.delta, p.depth), (1, MIN_DEPTH));
        // The next miss lands just past the window: everything prefetched was used.
        let p = s.on_miss(12 + MIN_DEPTH + 1).expect("still a trend");
        assert!(p.window_consumed);
        assert_eq!(p.depth, 2 * MIN_DEPTH);
    }

    #[test]
    fn strides_and_noise_are_tolerated_random_is_not_followed() {
        let mut s = Stream::default();
        for page in [0, 8, 16, 24, 1000, 40, 48] {
            s.on_miss(page);
        }
        assert_eq!(s.on_miss(56).map(|p| p.delta), Some(8), "majority survives one outlier");
        let mut r = Stream::default();
        let mut x = 12345usize;
        for _ in 0..100 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) % 100_000;
            assert_eq!(r.on_miss(x), None, "random misses never prefetch");
        }
    }

    #[test]
    fn backward_streams_work_too() {
        let mut s = Stream::default();
        for page in [100, 99, 98] {
            s.on_miss(page);
        }
        assert_eq!(s.on_miss(97).map(|p| p.delta), Some(-1));
    }
}
