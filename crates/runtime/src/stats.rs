//! Counters and latency histograms a runtime keeps, readable from any thread without locks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A log-linear latency histogram: 64 sub-buckets per power of two of nanoseconds, so any
/// percentile is reported within ~1.6%. Recording is two relaxed atomic adds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

/// 64 sub-buckets per power of two: a bucket is at most 1/64 of its value wide, so a p50 of
/// ~20 us is reported to within 0.3 us (with 16, to within 1 us: coarser than the
/// differences the low-latency goal is judged by).
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Sub-buckets of every power of two up to 2^63 ns; the last starts at 2^63 + 63 * 2^57.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < SUB as u64 {
            return usize::try_from(ns).expect("small");
        }
        let log = 63 - ns.leading_zeros();
        let sub = (ns >> (log - SUB_BITS)) as usize & (SUB - 1);
        (log - SUB_BITS + 1) as usize * SUB + sub
    }

    /// Lower bound of bucket `i`, in nanoseconds.
    fn lower(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let log = (i / SUB) as u32 + SUB_BITS - 1;
        (1u64 << log) | (((i % SUB) as u64) << (log - SUB_BITS))
    }

    /// Records one sample.
    pub fn record(&self, ns: u64) {
        self.buckets[Self::index(ns).min(BUCKETS - 1)].fetch_add(1, Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in microseconds, or 0 with no samples. Reports the middle of
    /// the bucket the quantile falls in.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = Self::lower(i);
                let hi = if i + 1 < BUCKETS { Self::lower(i + 1) } else { lo };
                return (lo + hi) as f64 / 2.0 / 1000.0;
            }
        }
        unreachable!("rank <= total")
    }

    /// Clears all samples.
    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Relaxed);
        }
    }
}

/// What a runtime has done, counted since start (or the last [`RuntimeStats::reset`]).
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Missing-page faults served from a memory host.
    pub remote_faults: AtomicU64,
    /// Missing-page faults on never-written pages, served locally with zeros.
    pub zero_faults: AtomicU64,
    /// Missing-page faults on pages evicted moments before and still held locally (async
    /// tracking's ring of recent victims), served by moving them back: no network trip.
    pub rescued_faults: AtomicU64,
    /// Write-protect faults (first write to a clean resident page).
    pub write_faults: AtomicU64,
    /// Fetched pages whose bookkeeping waited for the next fault's request (the handler
    /// shared its thread's CPU).
    pub deferred_installs: AtomicU64,
    /// Pages fetched from memory hosts.
    pub pages_fetched: AtomicU64,
    /// Pages evicted from local memory.
    pub pages_evicted: AtomicU64,
    /// Evicted or flushed pages that were dirty and written back.
    pub pages_written_back: AtomicU64,
    /// Payload bytes received for fetched pages.
    pub bytes_fetched: AtomicU64,
    /// Bytes sent to write pages back, frame headers included.
    pub bytes_written_back: AtomicU64,
    /// Changed 64-byte lines found in written-back pages (64 for a page-granular one).
    pub dirty_lines_written: AtomicU64,
    /// What a page-granular system would have sent for the same write-backs.
    pub page_granular_bytes: AtomicU64,
    /// Dirty pages whose contents matched their clean twin: nothing sent.
    pub clean_write_backs_skipped: AtomicU64,
    /// Pages written back by the periodic flusher or `Region::flush`.
    pub pages_flushed: AtomicU64,
    /// Async dirty tracking: `PAGEMAP_SCAN` calls (flusher sweeps and eviction checks).
    pub tracking_scans: AtomicU64,
    /// Async dirty tracking: time in those scans, and in moving eviction victims out.
    pub tracking_ns: AtomicU64,
    /// Pages requested ahead of a fault.
    pub prefetch_issued: AtomicU64,
    /// Prefetched pages then used (written, or passed over by the stream they predicted).
    pub prefetch_used: AtomicU64,
    /// Prefetched pages evicted without having been seen in use.
    pub prefetch_wasted: AtomicU64,
    /// Of `prefetch_issued`, pages requested because a fetched page pointed to them.
    pub pointer_prefetch_issued: AtomicU64,
    /// Pointer chains handed to a host to follow (`ChasePointers` requests).
    pub pointer_chains_offloaded: AtomicU64,
    /// Faults on a page whose prefetch was still in flight: the thread waited for it (these
    /// are not in `remote_faults`, which counts faults that sent a fetch of their own).
    pub prefetch_waits: AtomicU64,
    /// Pointer prefetches that missed their deadline: dropped, the page left to fault.
    pub prefetch_abandoned: AtomicU64,
    /// Pages fetched for a read but installed dirty because a write was predicted (saving a
    /// write-protect fault each when right).
    pub predicted_writes: AtomicU64,
    /// Memory hosts found dead (connection lost and not re-established, or silent too long).
    /// Not reset: a loss is news for the runtime's whole life.
    pub hosts_lost: AtomicU64,
    /// Dropped connections to live hosts re-established, their requests replayed.
    pub reconnects: AtomicU64,
    /// Pages whose lost copy or shard was rebuilt on another host.
    pub pages_rebuilt: AtomicU64,
    /// Bytes written to hosts by rebuilds.
    pub bytes_rebuilt: AtomicU64,
    /// Spans whose lost shard waits for or is being rebuilt (a gauge, not reset).
    pub spans_rebuilding: AtomicU64,
    /// 1 while a lost shard waits for a host to be rebuilt onto (every live host already
    /// holds a shard of its span, or has no room), else 0.
    pub rebuild_waiting_for_host: AtomicU64,
    /// Erasure-coded pages read with a parity shard standing in for a lost data shard.
    pub degraded_reads: AtomicU64,
    /// Time from reading a remote fault to installing its page, in the handler.
    pub fault_service: Histogram,
}

impl RuntimeStats {
    /// Zeroes every counter (e.g. between a benchmark's fill and its measured phase).
    pub fn reset(&self) {
        for c in [
            &self.remote_faults,
            &self.zero_faults,
            &self.rescued_faults,
            &self.write_faults,
            &self.deferred_installs,
            &self.pages_fetched,
            &self.pages_evicted,
            &self.pages_written_back,
            &self.bytes_fetched,
            &self.bytes_written_back,
            &self.dirty_lines_written,
            &self.page_granular_bytes,
            &self.clean_write_backs_skipped,
            &self.pages_flushed,
            &self.tracking_scans,
            &self.tracking_ns,
            &self.prefetch_issued,
            &self.prefetch_used,
            &self.prefetch_wasted,
            &self.pointer_prefetch_issued,
            &self.pointer_chains_offloaded,
            &self.prefetch_waits,
            &self.prefetch_abandoned,
            &self.predicted_writes,
            &self.pages_rebuilt,
            &self.bytes_rebuilt,
            &self.degraded_reads,
        ] {
            c.store(0, Relaxed);
        }
        self.fault_service.reset();
    }

    /// The counters now, as plain numbers.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            remote_faults: self.remote_faults.load(Relaxed),
            zero_faults: self.zero_faults.load(Relaxed),
            rescued_faults: self.rescued_faults.load(Relaxed),
            write_faults: self.write_faults.load(Relaxed),
            deferred_installs: self.deferred_installs.load(Relaxed),
            pages_fetched: self.pages_fetched.load(Relaxed),
            pages_evicted: self.pages_evicted.load(Relaxed),
            pages_written_back: self.pages_written_back.load(Relaxed),
            bytes_fetched: self.bytes_fetched.load(Relaxed),
            bytes_written_back: self.bytes_written_back.load(Relaxed),
            dirty_lines_written: self.dirty_lines_written.load(Relaxed),
            page_granular_bytes: self.page_granular_bytes.load(Relaxed),
            clean_write_backs_skipped: self.clean_write_backs_skipped.load(Relaxed),
            pages_flushed: self.pages_flushed.load(Relaxed),
            tracking_scans: self.tracking_scans.load(Relaxed),
            tracking_ns: self.tracking_ns.load(Relaxed),
            prefetch_issued: self.prefetch_issued.load(Relaxed),
            prefetch_used: self.prefetch_used.load(Relaxed),
            prefetch_wasted: self.prefetch_wasted.load(Relaxed),
            pointer_prefetch_issued: self.pointer_prefetch_issued.load(Relaxed),
            pointer_chains_offloaded: self.pointer_chains_offloaded.load(Relaxed),
            prefetch_waits: self.prefetch_waits.load(Relaxed),
            prefetch_abandoned: self.prefetch_abandoned.load(Relaxed),
            predicted_writes: self.predicted_writes.load(Relaxed),
            hosts_lost: self.hosts_lost.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            pages_rebuilt: self.pages_rebuilt.load(Relaxed),
            bytes_rebuilt: self.bytes_rebuilt.load(Relaxed),
            degraded_reads: self.degraded_reads.load(Relaxed),
            spans_rebuilding: self.spans_rebuilding.load(Relaxed),
            rebuild_waiting_for_host: self.rebuild_waiting_for_host.load(Relaxed) != 0,
            service_p50_us: self.fault_service.quantile_us(0.5),
            service_p99_us: self.fault_service.quantile_us(0.99),
        }
    }
}

/// A copy of [`RuntimeStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    /// See [`RuntimeStats::remote_faults`].
    pub remote_faults: u64,
    /// See [`RuntimeStats::zero_faults`].
    pub zero_faults: u64,
    /// See [`RuntimeStats::rescued_faults`].
    pub rescued_faults: u64,
    /// See [`RuntimeStats::write_faults`].
    pub write_faults: u64,
    /// See [`RuntimeStats::deferred_installs`].
    pub deferred_installs: u64,
    /// See [`RuntimeStats::pages_fetched`].
    pub pages_fetched: u64,
    /// See [`RuntimeStats::pages_evicted`].
    pub pages_evicted: u64,
    /// See [`RuntimeStats::pages_written_back`].
    pub pages_written_back: u64,
    /// See [`RuntimeStats::bytes_fetched`].
    pub bytes_fetched: u64,
    /// See [`RuntimeStats::bytes_written_back`].
    pub bytes_written_back: u64,
    /// See [`RuntimeStats::dirty_lines_written`].
    pub dirty_lines_written: u64,
    /// See [`RuntimeStats::page_granular_bytes`].
    pub page_granular_bytes: u64,
    /// See [`RuntimeStats::clean_write_backs_skipped`].
    pub clean_write_backs_skipped: u64,
    /// See [`RuntimeStats::pages_flushed`].
    pub pages_flushed: u64,
    /// See [`RuntimeStats::tracking_scans`].
    pub tracking_scans: u64,
    /// See [`RuntimeStats::tracking_ns`].
    pub tracking_ns: u64,
    /// See [`RuntimeStats::prefetch_issued`].
    pub prefetch_issued: u64,
    /// See [`RuntimeStats::prefetch_used`].
    pub prefetch_used: u64,
    /// See [`RuntimeStats::prefetch_wasted`].
    pub prefetch_wasted: u64,
    /// See [`RuntimeStats::pointer_prefetch_issued`].
    pub pointer_prefetch_issued: u64,
    /// See [`RuntimeStats::pointer_chains_offloaded`].
    pub pointer_chains_offloaded: u64,
    /// See [`RuntimeStats::prefetch_waits`].
    pub prefetch_waits: u64,
    /// See [`RuntimeStats::prefetch_abandoned`].
    pub prefetch_abandoned: u64,
    /// See [`RuntimeStats::predicted_writes`].
    pub predicted_writes: u64,
    /// See [`RuntimeStats::hosts_lost`].
    pub hosts_lost: u64,
    /// See [`RuntimeStats::reconnects`].
    pub reconnects: u64,
    /// See [`RuntimeStats::pages_rebuilt`].
    pub pages_rebuilt: u64,
    /// See [`RuntimeStats::bytes_rebuilt`].
    pub bytes_rebuilt: u64,
    /// See [`RuntimeStats::degraded_reads`].
    pub degraded_reads: u64,
    /// See [`RuntimeStats::spans_rebuilding`].
    pub spans_rebuilding: u64,
    /// See [`RuntimeStats::rebuild_waiting_for_host`].
    pub rebuild_waiting_for_host: bool,
    /// Median fault service time in the handler.
    pub service_p50_us: f64,
    /// 99th percentile fault service time in the handler.
    pub service_p99_us: f64,
}

impl StatsSnapshot {
    /// All faults that needed the handler (remote, zero-fill, rescued and write-protect).
    pub fn faults(&self) -> u64 {
        self.remote_faults + self.zero_faults + self.rescued_faults + self.write_faults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_a_bucket() {
        let h = Histogram::default();
        for ns in 1..=10_000u64 {
            h.record(ns * 10);
        }
        assert_eq!(h.count(), 10_000);
        let p50 = h.quantile_us(0.5);
        assert!((p50 - 50.0).abs() / 50.0 < 0.016, "p50 {p50}");
        let p99 = h.quantile_us(0.99);
        assert!((p99 - 99.0).abs() / 99.0 < 0.016, "p99 {p99}");
        h.reset();
        assert_eq!(h.quantile_us(0.5), 0.0);
    }

    #[test]
    fn bucket_bounds_are_monotonic() {
        for i in 1..BUCKETS - 1 {
            assert!(Histogram::lower(i) < Histogram::lower(i + 1), "bucket {i}");
            assert_eq!(Histogram::index(Histogram::lower(i)), i);
        }
    }
}
