//! Miss-stream prefetching: find the trend in a thread's recent faults on a region and fetch
//! ahead of it. Each faulting thread (named by the kernel with `UFFD_FEATURE_THREAD_ID`) has a
//! stream of its own, so threads scanning their own parts of a region do not mix their trends
//! into noise.
//!
//! The detector keeps the deltas between the last few missing pages and looks for a majority
//! delta with Boyer-Moore voting (as Leap does): a sequential or strided stream has one, even
//! with some noise mixed in; a random stream has none and gets no prefetch at all. The depth
//! doubles each time the stream runs off the end of what was prefetched (every prefetched page
//! was needed) and falls back to the minimum when the trend breaks.
//!
//! A pager sees misses only, and a working prefetcher removes the very misses the trend is
//! made of. So a miss just past the window counts as one more step of the trend (the pages
//! between were used), and a thread caught waiting for a page still in flight in the second
//! half of the window issues the next window at once: the stream keeps going without a
//! blocking miss per window.
//!
//! Pointer mode adds content-directed prefetch for linked structures, which have no trend to
//! find: see `handler/pointer_chase.rs`.

/// Deltas remembered per stream.
const HISTORY: usize = 8;
/// Miss streams kept per region, one per faulting thread (least recently used replaced).
const THREAD_STREAMS: usize = 8;
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

/// What to prefetch: `depth` pages at `start + k * delta`, k = 0..depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prediction {
    pub start: i64,
    pub delta: i64,
    pub depth: usize,
    /// The miss landed exactly past the previous prefetch window: all of it was used.
    pub window_consumed: bool,
}

/// A prefetch window: first page, delta, pages.
pub(crate) type Window = (usize, i64, usize);

/// One thread's miss stream in a region, and its last prefetch window.
#[derive(Debug, Default)]
pub(crate) struct ThreadStream {
    pub stream: Stream,
    pub window: Option<Window>,
}

/// Which of a region's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKey {
    /// The region's stream of every thread's misses.
    Shared,
    /// One thread's (by thread id).
    Thread(u32),
}

/// A region's miss streams: one per faulting thread, so threads that each read their own
/// part of a region in order keep their trends (one history would mix them into none), and
/// one of all misses, which still follows a scan that several threads share (a pool taking
/// the next chunk in turn) and serves where the kernel names no thread (tid 0).
#[derive(Debug, Default)]
pub(crate) struct Streams {
    shared: ThreadStream,
    /// (thread id, last use, stream).
    entries: Vec<(u32, u64, ThreadStream)>,
    clock: u64,
}

impl Streams {
    /// The stream of thread `tid`, started afresh (in place of the least recently used one,
    /// when THREAD_STREAMS are kept) if it has none.
    fn thread(&mut self, tid: u32) -> &mut ThreadStream {
        self.clock += 1;
        let i = match self.entries.iter().position(|e| e.0 == tid) {
            Some(i) => i,
            None if self.entries.len() < THREAD_STREAMS => {
                self.entries.push((tid, 0, ThreadStream::default()));
                self.entries.len() - 1
            }
            None => {
                let i = (0..self.entries.len()).min_by_key(|&i| self.entries[i].1).expect("full");
                self.entries[i] = (tid, 0, ThreadStream::default());
                i
            }
        };
        self.entries[i].1 = self.clock;
        &mut self.entries[i].2
    }

    /// The stream `key`, if kept (a thread's is never started here).
    pub(crate) fn find(&mut self, key: StreamKey) -> Option<&mut ThreadStream> {
        match key {
            StreamKey::Shared => Some(&mut self.shared),
            StreamKey::Thread(tid) => self.entries.iter_mut().find(|e| e.0 == tid).map(|e| &mut e.2),
        }
    }

    /// Records a miss at `page` by thread `tid` (0: unknown) in its stream and the shared
    /// one; the prediction to follow, its own stream's first, and whose it is.
    pub(crate) fn on_miss(&mut self, page: usize, tid: u32) -> Option<(StreamKey, Prediction)> {
        let own = (tid != 0).then(|| self.thread(tid).stream.on_miss(page)).flatten();
        let shared = self.shared.stream.on_miss(page);
        own.map(|p| (StreamKey::Thread(tid), p)).or(shared.map(|p| (StreamKey::Shared, p)))
    }
}

/// The miss-stream state of one thread in a region.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    deltas: [i64; HISTORY],
    filled: usize,
    next: usize,
    last: Option<usize>,
    depth: usize,
    /// The delta of the last prefetch window.
    trend: i64,
    /// The page just past the last prefetch window.
    window_end: Option<usize>,
}

impl Stream {
    /// Records a miss at `page` and says what to prefetch, if anything.
    pub(crate) fn on_miss(&mut self, page: usize) -> Option<Prediction> {
        let window_consumed = self.window_end == Some(page);
        if let Some(last) = self.last {
            // Past a consumed window the stream went on by its trend; the raw distance
            // (the window's length) would hide it.
            let delta = if window_consumed { self.trend } else { page as i64 - last as i64 };
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
        self.trend = delta;
        self.window_end = usize::try_from(page as i64 + delta * (self.depth as i64 + 1)).ok();
        Some(Prediction { start: page as i64 + delta, delta, depth: self.depth, window_consumed })
    }

    /// A thread waits for `page`, a prefetch still in flight. If it lies in the second half of
    /// the last window, the stream is catching up with the prefetches: returns the next
    /// window (twice as deep), which starts where the last one ends.
    pub(crate) fn on_wait(&mut self, page: usize) -> Option<Prediction> {
        let end = self.window_end?;
        let (delta, depth) = (self.trend, self.depth);
        let left = (end as i64 - page as i64) / delta;
        if (end as i64 - page as i64) % delta != 0 || left < 1 || left > (depth as i64 + 1) / 2 {
            return None;
        }
        self.depth = (depth * 2).min(MAX_DEPTH);
        self.last = Some(page);
        self.window_end = usize::try_from(end as i64 + delta * self.depth as i64).ok();
        Some(Prediction { start: end as i64, delta, depth: self.depth, window_consumed: false })
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
        assert_eq!((p.start, p.delta, p.depth), (13, 1, MIN_DEPTH));
        // The next misses land just past each window: everything prefetched was used, and
        // the trend holds although the misses are a window apart.
        let mut page = 12 + MIN_DEPTH + 1;
        for depth in [2, 4, 8, 16].map(|k| k * MIN_DEPTH) {
            let p = s.on_miss(page).expect("still a trend");
            assert!(p.window_consumed);
            assert_eq!((p.start, p.depth), (page as i64 + 1, depth));
            page += depth + 1;
        }
    }

    #[test]
    fn a_wait_late_in_the_window_issues_the_next_one() {
        let mut s = Stream::default();
        for page in [100, 102, 104] {
            s.on_miss(page);
        }
        // Window: 106, 108, 110, 112 (end 114).
        assert_eq!(s.on_wait(106), None, "early in the window: nothing yet");
        assert_eq!(s.on_wait(107), None, "not a page of the stream");
        let p = s.on_wait(110).expect("second half");
        assert_eq!((p.start, p.delta, p.depth), (114, 2, 2 * MIN_DEPTH));
        // A miss right past the extended window still continues the stream.
        let p = s.on_miss(114 + 2 * 2 * MIN_DEPTH).expect("consumed");
        assert!(p.window_consumed);
        assert_eq!(p.delta, 2);
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
    fn interleaved_threads_each_keep_their_stream() {
        let (mut streams, mut shared) = (Streams::default(), Stream::default());
        let (mut a, mut b) = (None, None);
        // Two threads reading their own halves in order, their misses interleaved.
        for k in 0..6 {
            a = streams.thread(7).stream.on_miss(k);
            b = streams.thread(9).stream.on_miss(50_000 + k);
            for page in [k, 50_000 + k] {
                let p = shared.on_miss(page);
                assert!(p.is_none_or(|p| p.delta.abs() > 1), "one history misses the trend: {p:?}");
            }
        }
        assert_eq!(a.map(|p| (p.start, p.delta)), Some((6, 1)));
        assert_eq!(b.map(|p| (p.start, p.delta)), Some((50_006, 1)));
    }

    #[test]
    fn the_least_recently_used_thread_stream_gives_way() {
        let mut streams = Streams::default();
        for tid in 1..=THREAD_STREAMS as u32 {
            streams.thread(tid).stream.on_miss(10);
            streams.thread(tid).stream.on_miss(11);
        }
        streams.thread(1); // thread 2 is now the least recently used
        streams.thread(100).stream.on_miss(0);
        assert!(streams.find(StreamKey::Thread(2)).is_none(), "thread 2 gave way");
        assert!(streams.thread(1).stream.on_miss(12).is_some(), "thread 1 kept its history");
        assert_eq!(streams.thread(2).stream.on_miss(12), None, "thread 2 starts over");
        assert_eq!(streams.entries.len(), THREAD_STREAMS);
    }

    #[test]
    fn a_scan_shared_by_threads_is_followed_by_the_shared_stream() {
        // A pool of 12 threads (more than are kept) taking the next page in turn.
        let mut streams = Streams::default();
        let mut last = None;
        for page in 0..48 {
            last = streams.on_miss(page, 100 + (page % 12) as u32);
        }
        let (key, p) = last.expect("the scan is followed");
        assert_eq!((key, p.delta), (StreamKey::Shared, 1));
        // Where the kernel names no thread, the shared stream is all there is.
        let mut anonymous = Streams::default();
        for page in [5, 6, 7] {
            last = anonymous.on_miss(page, 0);
        }
        assert_eq!(last.map(|(key, p)| (key, p.start)), Some((StreamKey::Shared, 8)));
        assert!(anonymous.entries.is_empty());
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
