//! Crash-test harness: child processes run transactions on a pool and die at random moments
//! (`SIGKILL`) or at injected failpoints; after each death the parent checks that the pool
//! holds exactly the state after some committed transaction `k`, with
//! `last acknowledged <= k <= last begun`.
//!
//! The workload is a pure function of (seed, k): transaction `k` stores `k` in the region's
//! first 8 bytes and writes pseudo-random values derived from `(seed, k)` at pseudo-random
//! offsets (sometimes across many pages). So the parent rebuilds the expected contents for any
//! `k` and compares every byte. Children also run aborted transactions (error or panic) that
//! scribble over the region; none of that may ever show. Children acknowledge a transaction
//! on their stdout only after its commit returned (durable). Some children use several threads
//! (group commit) or asynchronous commits.
//!
//! The child is the current executable re-run with `CLUSTERMEM_PMEM_CRASH_CHILD` set: any
//! binary that calls [`maybe_run_crash_child`] first thing in `main` can host it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::failpoint::{FAILPOINTS, FAILPOINT_ENV, FAILPOINT_EXIT_CODE};
use crate::region::{read_committed, PersistentRegion, PmemError, RegionOptions};
use crate::rng::{mix, SplitMix64};

/// Environment variable that turns a process into a crash-test child; its value is the pool.
pub const CRASH_CHILD_ENV: &str = "CLUSTERMEM_PMEM_CRASH_CHILD";
const ENV_CONF: &str = "CLUSTERMEM_PMEM_CRASH_CONF";

/// What to run.
#[derive(Debug, Clone)]
pub struct CrashTestOptions {
    /// Pool file to create and torture. An existing file is replaced only if it is a
    /// clustermem pool; anything else is refused.
    pub pool: PathBuf,
    /// Number of child processes to kill (and states to check).
    pub iterations: u64,
    /// Seed of the workload and of the kill schedule; a failing run replays from it.
    pub seed: u64,
    /// Executable that runs the child (it must call [`maybe_run_crash_child`] first);
    /// default: the current executable.
    pub child_exe: Option<PathBuf>,
    /// Region size (default 256 KiB).
    pub region_bytes: usize,
    /// Log area size; small, so that checkpoints (and crashes inside them) are frequent
    /// (default 16 KiB).
    pub log_bytes: u64,
    /// Longest a child runs before a random kill (default 40 ms).
    pub max_run: Duration,
}

impl CrashTestOptions {
    /// Defaults for `pool`: 100 iterations, seed 1.
    pub fn new(pool: impl Into<PathBuf>) -> Self {
        Self {
            pool: pool.into(),
            iterations: 100,
            seed: 1,
            child_exe: None,
            region_bytes: 256 << 10,
            log_bytes: 16 << 10,
            max_run: Duration::from_millis(40),
        }
    }
}

/// What a crash test found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CrashTestReport {
    /// Children run, killed and checked.
    pub iterations: u64,
    /// States that were not exactly a committed prefix (must be 0).
    pub violations: u64,
    /// Details of the first violations.
    pub violation_details: Vec<String>,
    /// Committed transactions whose effects were checked (the final `k`).
    pub committed_tx_checked: u64,
    /// Children killed with `SIGKILL` at a random moment.
    pub kills: u64,
    /// Children that died at an injected failpoint.
    pub failpoint_kills: u64,
    /// Failpoint runs whose step was not reached in time (then killed; counted in `kills`).
    pub failpoints_not_reached: u64,
    /// Acknowledged commits over all children.
    pub acks: u64,
    /// Recovered states that were newer than the last acknowledgement (committed but killed
    /// before acknowledging: allowed).
    pub unacknowledged_survivors: u64,
    /// Seed used.
    pub seed: u64,
}

/// Errors that stop a crash test (as opposed to violations, which it reports).
#[derive(Debug, thiserror::Error)]
pub enum CrashTestError {
    /// Setting up or reading the pool failed.
    #[error(transparent)]
    Pmem(#[from] PmemError),
    /// The pool path holds something that is not a clustermem pool.
    #[error("{0} exists and is not a clustermem pool; refusing to replace it")]
    NotAPool(PathBuf),
    /// Starting or talking to a child failed.
    #[error("running the crash-test child {exe}")]
    Child {
        /// Executable.
        exe: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy)]
struct ChildConf {
    seed: u64,
    region_bytes: usize,
    threads: u64,
    async_commit: bool,
}

impl ChildConf {
    fn encode(&self) -> String {
        format!("{}:{}:{}:{}", self.seed, self.region_bytes, self.threads, u8::from(self.async_commit))
    }

    fn decode(s: &str) -> Option<Self> {
        let mut it = s.split(':');
        Some(Self {
            seed: it.next()?.parse().ok()?,
            region_bytes: it.next()?.parse().ok()?,
            threads: it.next()?.parse().ok()?,
            async_commit: it.next()? == "1",
        })
    }
}

/// Applies transaction `k` of `seed` to `mem`.
fn apply_tx(seed: u64, k: u64, mem: &mut [u8]) {
    let mut rng = SplitMix64::new(mix(seed, k));
    let slots = (mem.len() as u64 - 8) / 8;
    let updates = if rng.below(16) == 0 { 64 + rng.below(256) } else { 1 + rng.below(8) };
    for _ in 0..updates {
        let at = usize::try_from(8 + rng.below(slots) * 8).expect("inside region");
        mem[at..at + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    mem[..8].copy_from_slice(&k.to_le_bytes());
}

fn counter(mem: &[u8]) -> u64 {
    u64::from_le_bytes(mem[..8].try_into().expect("8 bytes"))
}

/// If this process is a crash-test child, runs the child workload and never returns;
/// otherwise returns at once. Call it first thing in `main` of any binary that may host
/// crash-test children (the CLI, test harnesses).
pub fn maybe_run_crash_child() {
    let Some(pool) = std::env::var_os(CRASH_CHILD_ENV) else { return };
    let code = match std::env::var(ENV_CONF).ok().as_deref().and_then(ChildConf::decode) {
        Some(conf) => match run_child(Path::new(&pool), conf) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("crash child: {e}");
                2
            }
        },
        None => {
            eprintln!("crash child: missing or bad {ENV_CONF}");
            2
        }
    };
    std::process::exit(code);
}

/// One line, unbuffered: the parent may kill us right after.
fn report(tag: char, k: u64) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{tag} {k}");
    let _ = out.flush();
}

#[derive(Debug)]
struct Scribble;

fn run_child(pool: &Path, conf: ChildConf) -> Result<(), PmemError> {
    // Aborts by panic are part of the workload; keep stderr for real failures.
    std::panic::set_hook(Box::new(|_| {}));
    let region = PersistentRegion::open_with(pool, conf.region_bytes, RegionOptions::default())?;
    let region = &region;
    std::thread::scope(|s| {
        let workers: Vec<_> =
            (0..conf.threads).map(|t| s.spawn(move || child_worker(region, conf, t))).collect();
        workers.into_iter().map(|w| w.join().unwrap_or(Ok(()))).collect::<Result<Vec<()>, PmemError>>()
    })?;
    Ok(())
}

fn child_worker(region: &PersistentRegion, conf: ChildConf, thread: u64) -> Result<(), PmemError> {
    let mut rng = SplitMix64::new(mix(conf.seed ^ 0xAB0F, thread ^ (u64::from(std::process::id()) << 8)));
    let mut pending = std::collections::VecDeque::new();
    loop {
        match rng.below(6) {
            0 => {
                // An aborted transaction: scribbles, then fails.
                let r = region.transaction(|mem| {
                    for _ in 0..1 + rng.below(32) {
                        let at = usize::try_from(rng.below(mem.len() as u64)).expect("inside region");
                        mem[at] ^= 0x5A;
                    }
                    Err::<(), _>(Scribble)
                });
                assert!(matches!(r, Err(crate::TxError::Aborted(Scribble))), "abort expected");
            }
            1 => {
                // A panicking transaction.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    region.transaction(|mem| -> Result<(), Scribble> {
                        mem[..8].fill(0xEE);
                        panic!("scribble")
                    })
                }));
                assert!(r.is_err(), "the panic must propagate");
            }
            _ => {
                let tx = |mem: &mut [u8]| {
                    let k = counter(mem) + 1;
                    report('B', k);
                    apply_tx(conf.seed, k, mem);
                    Ok::<u64, Scribble>(k)
                };
                if conf.async_commit {
                    let (k, h) = region.transaction_async(tx).map_err(unwrap_tx)?;
                    pending.push_back((k, h));
                    if pending.len() > 4 || rng.below(3) == 0 {
                        while let Some((k, h)) = pending.pop_front() {
                            if let Some(h) = h {
                                h.wait()?;
                            }
                            report('A', k);
                        }
                    }
                } else {
                    let k = region.transaction(tx).map_err(unwrap_tx)?;
                    report('A', k);
                }
            }
        }
    }
}

fn unwrap_tx(e: crate::TxError<Scribble>) -> PmemError {
    match e {
        crate::TxError::Pmem(e) => e,
        crate::TxError::Aborted(Scribble) => PmemError::Broken("unexpected abort".into()),
    }
}

/// Runs the crash test described by `opts`. Prints nothing; returns the report.
pub fn crashtest(opts: &CrashTestOptions) -> Result<CrashTestReport, CrashTestError> {
    let exe = match &opts.child_exe {
        Some(p) => p.clone(),
        None => {
            std::env::current_exe().map_err(|source| CrashTestError::Child { exe: PathBuf::new(), source })?
        }
    };
    if opts.pool.exists() {
        if read_committed(&opts.pool).is_err() {
            return Err(CrashTestError::NotAPool(opts.pool.clone()));
        }
        std::fs::remove_file(&opts.pool).map_err(PmemError::io("removing the old crash-test pool"))?;
    }
    // Create the pool with a small log so checkpoints happen often.
    drop(PersistentRegion::open_with(
        &opts.pool,
        opts.region_bytes,
        RegionOptions { log_bytes: Some(opts.log_bytes), changes: None },
    )?);

    let mut rep = CrashTestReport { seed: opts.seed, ..CrashTestReport::default() };
    let mut rng = SplitMix64::new(opts.seed);
    let mut model = vec![0u8; opts.region_bytes];
    let (mut model_k, mut acked_max) = (0u64, 0u64);
    for it in 0..opts.iterations {
        let conf = ChildConf {
            seed: opts.seed,
            region_bytes: opts.region_bytes,
            threads: 1 + rng.below(3),
            async_commit: rng.below(3) == 0,
        };
        let failpoint = (rng.below(2) == 0).then(|| {
            let name = FAILPOINTS[usize::try_from(rng.below(FAILPOINTS.len() as u64)).expect("small")];
            let at = if name.starts_with("ckpt") { 1 + rng.below(3) } else { 1 + rng.below(40) };
            format!("{name}:{at}")
        });
        let mut cmd = Command::new(&exe);
        cmd.env(CRASH_CHILD_ENV, &opts.pool)
            .env(ENV_CONF, conf.encode())
            .env_remove(FAILPOINT_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fp) = &failpoint {
            cmd.env(FAILPOINT_ENV, fp);
        }
        let child_err = |source| CrashTestError::Child { exe: exe.clone(), source };
        let mut child = cmd.spawn().map_err(child_err)?;
        let stdout = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new((0u64, 0u64, 0u64))); // (begun max, acked max, acks)
        let l2 = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut g = l2.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match line.split_once(' ') {
                    Some(("B", k)) => g.0 = g.0.max(k.parse().unwrap_or(0)),
                    Some(("A", k)) => {
                        g.1 = g.1.max(k.parse().unwrap_or(0));
                        g.2 += 1;
                    }
                    _ => {}
                }
            }
        });
        let deadline = if failpoint.is_some() {
            Instant::now() + Duration::from_secs(1)
        } else {
            let ms = u64::try_from(opts.max_run.as_millis()).unwrap_or(u64::MAX).max(1);
            Instant::now() + Duration::from_millis(rng.below(ms))
        };
        let status = loop {
            if let Some(s) = child.try_wait().map_err(child_err)? {
                break Some(s);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let status = match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                rep.kills += 1;
                if failpoint.is_some() {
                    rep.failpoints_not_reached += 1;
                }
                child.wait().map_err(child_err)?
            }
        };
        let _ = reader.join();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let (begun, acked, acks) = *lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        rep.acks += acks;
        rep.iterations += 1;
        let violation = |rep: &mut CrashTestReport, msg: String| {
            rep.violations += 1;
            if rep.violation_details.len() < 10 {
                rep.violation_details.push(format!("iteration {it} (failpoint {failpoint:?}): {msg}"));
            }
        };
        if status.code() == Some(FAILPOINT_EXIT_CODE) {
            rep.failpoint_kills += 1;
        } else if status.code().is_some() {
            violation(&mut rep, format!("child exited with {status}: {}", stderr.trim()));
        }
        acked_max = acked_max.max(acked);
        let state = read_committed(&opts.pool)?;
        let k = counter(&state);
        if k < acked_max || k < model_k {
            violation(
                &mut rep,
                format!("recovered k={k} but k={} was acknowledged/seen", acked_max.max(model_k)),
            );
        } else if k > begun.max(model_k) {
            violation(&mut rep, format!("recovered k={k} but only k<={} began", begun.max(model_k)));
        } else {
            if k > acked_max {
                rep.unacknowledged_survivors += 1;
            }
            while model_k < k {
                model_k += 1;
                apply_tx(opts.seed, model_k, &mut model);
            }
            if let Some(at) = state.iter().zip(&model).position(|(a, b)| a != b) {
                violation(&mut rep, format!("state after k={k} differs from the model at byte {at}"));
            }
        }
        if rep.violations > 0 {
            break;
        }
    }
    // Finally recover in-process through the full open path and compare again.
    let region = PersistentRegion::open(&opts.pool, opts.region_bytes)?;
    let state = region.snapshot();
    drop(region);
    if state != model {
        rep.violations += 1;
        rep.violation_details.push(format!("final open: state differs from the model at k={model_k}"));
    }
    rep.committed_tx_checked = model_k;
    Ok(rep)
}
