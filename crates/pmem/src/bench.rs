//! Transaction throughput benchmark: each transaction writes `updates_per_tx` values of
//! `update_bytes` at random 64-byte-aligned offsets of a 64 MiB region and commits durably.
//! The same workload as `bench/pmdk/pmdk_tx.c` (one `TX_ADD` per update), for a ratio.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::region::{PersistentRegion, PmemError, RegionStats, TxError};
use crate::rng::{mix, SplitMix64};

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct TxBenchOptions {
    /// Pool file (created if absent; an existing pool must hold `region_bytes`).
    pub pool: PathBuf,
    /// Region size (default 64 MiB).
    pub region_bytes: usize,
    /// Updates per transaction (default 1).
    pub updates_per_tx: usize,
    /// Bytes per update, 1..=64 (default 8: a u64).
    pub update_bytes: usize,
    /// Committing threads (default 1); more than one shares fdatasyncs (group commit).
    pub threads: usize,
    /// How long to run (default 5 s) unless `tx_count` is set.
    pub duration: Duration,
    /// Stop after this many transactions in total instead of after `duration`.
    pub tx_count: Option<u64>,
    /// Commit asynchronously, keeping up to 32 commits in flight per thread, so that even one
    /// thread shares syncs (default false: each transaction waits until durable).
    pub async_commit: bool,
    /// Seed of the offsets (values also mix in the clock, so reruns change bytes).
    pub seed: u64,
}

impl TxBenchOptions {
    /// Defaults for `pool`.
    pub fn new(pool: impl Into<PathBuf>) -> Self {
        Self {
            pool: pool.into(),
            region_bytes: 64 << 20,
            updates_per_tx: 1,
            update_bytes: 8,
            threads: 1,
            duration: Duration::from_secs(5),
            tx_count: None,
            async_commit: false,
            seed: 1,
        }
    }
}

/// Benchmark results.
#[derive(Debug, Clone, Serialize)]
pub struct TxBenchReport {
    /// Durable transactions per second.
    pub tx_per_s: f64,
    /// Redo log bytes appended per transaction (record header included).
    pub bytes_logged_per_tx: f64,
    /// Bytes whose value actually changed per transaction.
    pub bytes_changed_per_tx: f64,
    /// Committing threads.
    pub threads: usize,
    /// Updates per transaction.
    pub updates_per_tx: usize,
    /// Bytes per update.
    pub update_bytes: usize,
    /// Whether commits were asynchronous.
    pub async_commit: bool,
    /// Transactions committed.
    pub txs: u64,
    /// fdatasync calls during the run (commits and checkpoints).
    pub fdatasyncs: u64,
    /// Transactions per fdatasync (group-commit factor).
    pub tx_per_fdatasync: f64,
    /// Write-protect faults per transaction.
    pub write_faults_per_tx: f64,
    /// Checkpoints during the run.
    pub checkpoints: u64,
    /// Wall time of the run.
    pub wall_s: f64,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The region failed.
    #[error(transparent)]
    Pmem(#[from] PmemError),
    /// Options out of range.
    #[error("bad benchmark options: {0}")]
    Options(&'static str),
}

/// Runs the transaction benchmark. Prints nothing; returns the report.
pub fn bench_tx(opts: &TxBenchOptions) -> Result<TxBenchReport, BenchError> {
    if opts.update_bytes == 0 || opts.update_bytes > 64 {
        return Err(BenchError::Options("update_bytes must be 1..=64"));
    }
    if opts.threads == 0 || opts.updates_per_tx == 0 {
        return Err(BenchError::Options("threads and updates_per_tx must be >= 1"));
    }
    let region = PersistentRegion::open(&opts.pool, opts.region_bytes)?;
    let before = region.stats();
    let start = Instant::now();
    let deadline = start + opts.duration;
    let per_thread = opts.tx_count.map(|n| n.div_ceil(opts.threads as u64));
    let results: Vec<Result<u64, PmemError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..opts.threads)
            .map(|t| {
                let region = &region;
                s.spawn(move || worker(region, opts, t as u64, deadline, per_thread))
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("bench worker panicked")).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let after = region.stats();
    let mut txs = 0;
    for r in results {
        txs += r?;
    }
    Ok(report(opts, &before, &after, txs, wall))
}

#[expect(clippy::cast_precision_loss, reason = "reporting ratios")]
fn report(
    opts: &TxBenchOptions,
    before: &RegionStats,
    after: &RegionStats,
    txs: u64,
    wall: f64,
) -> TxBenchReport {
    let commits = (after.commits - before.commits).max(1) as f64;
    let fdatasyncs = after.fdatasyncs - before.fdatasyncs;
    TxBenchReport {
        tx_per_s: txs as f64 / wall,
        bytes_logged_per_tx: (after.log_bytes - before.log_bytes) as f64 / commits,
        bytes_changed_per_tx: (after.changed_bytes - before.changed_bytes) as f64 / commits,
        threads: opts.threads,
        updates_per_tx: opts.updates_per_tx,
        update_bytes: opts.update_bytes,
        async_commit: opts.async_commit,
        txs,
        fdatasyncs,
        tx_per_fdatasync: txs as f64 / fdatasyncs.max(1) as f64,
        write_faults_per_tx: (after.write_faults - before.write_faults) as f64 / commits,
        checkpoints: after.checkpoints - before.checkpoints,
        wall_s: wall,
    }
}

fn worker(
    region: &PersistentRegion,
    opts: &TxBenchOptions,
    thread: u64,
    deadline: Instant,
    count: Option<u64>,
) -> Result<u64, PmemError> {
    let mut rng = SplitMix64::new(mix(opts.seed, thread));
    // Values differ from run to run: a rerun on the same pool must really change bytes.
    let nonce = mix(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
        thread,
    );
    let lines = (region.len() / 64) as u64;
    let mut in_flight = std::collections::VecDeque::new();
    let mut done = 0u64;
    loop {
        let finished = match count {
            Some(n) => done >= n,
            None => done % 64 == 0 && Instant::now() >= deadline,
        };
        if finished {
            break;
        }
        let tx = |mem: &mut [u8]| {
            for _ in 0..opts.updates_per_tx {
                let at = usize::try_from(rng.below(lines) * 64).expect("inside region");
                let v = (rng.next_u64() ^ nonce).to_le_bytes();
                for (i, b) in mem[at..at + opts.update_bytes].iter_mut().enumerate() {
                    *b = v[i % 8];
                }
            }
            Ok::<(), std::convert::Infallible>(())
        };
        if opts.async_commit {
            let ((), h) = region.transaction_async(tx).map_err(infallible)?;
            in_flight.extend(h);
            if in_flight.len() >= 32 {
                while let Some(h) = in_flight.pop_front() {
                    h.wait()?;
                }
            }
        } else {
            region.transaction(tx).map_err(infallible)?;
        }
        done += 1;
    }
    for h in in_flight {
        h.wait()?;
    }
    Ok(done)
}

fn infallible(e: TxError<std::convert::Infallible>) -> PmemError {
    match e {
        TxError::Pmem(e) => e,
        TxError::Aborted(never) => match never {},
    }
}
