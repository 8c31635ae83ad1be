//! Crash injection at named steps of commit, checkpoint and recovery.
//!
//! Always compiled in, armed only by the environment: `CLUSTERMEM_PMEM_FAILPOINT=NAME:N` makes
//! the process `_exit` the N-th time it reaches step NAME (counting from 1). `_exit` skips
//! destructors and buffered I/O, like a `SIGKILL` at that instant; bytes already handed to the
//! kernel stay in the page cache, which is exactly the state a process crash leaves. The cost
//! when unarmed is one relaxed load per step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable that arms a failpoint: `NAME:N`.
pub const FAILPOINT_ENV: &str = "CLUSTERMEM_PMEM_FAILPOINT";

/// Exit status of a process stopped by a failpoint.
pub const FAILPOINT_EXIT_CODE: i32 = 86;

/// Every failpoint step, in the order a commit and a checkpoint reach them.
pub const FAILPOINTS: &[&str] = &[
    // A commit record is half written (torn), then the process dies.
    "log-torn",
    // The commit record is written, not yet synced.
    "log-written",
    // The commit is durable, not yet acknowledged to the caller.
    "log-synced",
    // A checkpoint (also the one that ends recovery) wrote some data lines, unsynced.
    "ckpt-data-written",
    // The checkpoint's data lines are synced; the header still names the old log.
    "ckpt-data-synced",
    // The new header slot is written, unsynced.
    "ckpt-header-written",
    // The new header is durable; the log not yet reused.
    "ckpt-header-synced",
];

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(FAILPOINT_ENV).ok()?;
            let (name, at) = spec.split_once(':')?;
            Some(Armed { name: name.to_owned(), at: at.parse().ok()?, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Whether step `name` fires now (counts the visit).
pub(crate) fn fires(name: &str) -> bool {
    match armed() {
        Some(a) if a.name == name => a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at,
        _ => false,
    }
}

/// Ends the process abruptly as a crash would.
pub(crate) fn crash_now() -> ! {
    // SAFETY: `_exit` has no preconditions; it never returns.
    unsafe { libc::_exit(FAILPOINT_EXIT_CODE) }
}

/// Crashes here if step `name` is armed for this visit.
pub(crate) fn hit(name: &str) {
    if fires(name) {
        crash_now();
    }
}
