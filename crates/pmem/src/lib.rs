//! clustermem persistent regions: memory whose committed contents survive crashes, changed by
//! failure-atomic transactions in which the program writes plain memory.
//!
//! The runtime finds what a transaction wrote by itself: pages are write-protected with
//! userfaultfd ([`uffd_wp`], `tracker`), the first write to a page saves a clean twin, and
//! commit diffs written pages against their twins in 64-byte lines and appends only the
//! changed bytes to a redo log with one `fdatasync` per (group) commit ([`region`]). The pool
//! file's data area is written only with committed lines, at checkpoints.
//!
//! ```no_run
//! use clustermem_pmem::PersistentRegion;
//! let region = PersistentRegion::open("/tmp/example.pool", 1 << 20)?;
//! region.transaction(|mem| {
//!     mem[0..8].copy_from_slice(&42u64.to_le_bytes());
//!     Ok::<_, std::convert::Infallible>(())
//! })?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
//!
//! Proof lives in [`crashtest`] (processes killed at random and at failpoints) and in the
//! simulated-disk tests; speed in [`bench`].

#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod changelog;
pub mod crashtest;
pub mod failpoint;
mod layout;
pub mod region;
pub mod rng;
pub mod storage;
mod tracker;
pub mod uffd_wp;

pub use bench::{bench_tx, TxBenchOptions, TxBenchReport};
pub use changelog::{ChangeLog, ChangeLogId, ChangeLogInfo};
pub use crashtest::{crashtest, maybe_run_crash_child, CrashTestOptions, CrashTestReport};
pub use region::{
    read_committed, read_committed_storage, CommitHandle, PersistentRegion, PmemError, RegionOptions,
    RegionStats, Tx, TxError,
};
pub use storage::{FileStorage, SimDisk, Storage};
pub use tracker::TrackError;
pub use uffd_wp::UffdError;
