//! This process's figures for `clustermem run --stats-json`, as `PID-IMAGE.json` in
//! `CLUSTERMEM_STATS_DIR` (IMAGE: when this program image started, in nanoseconds, so an
//! image that execs another leaves its own file). Written at exit, and every
//! [`SNAPSHOT_EVERY`] before: a process killed by a signal runs no exit handlers, and without
//! the snapshots its figures would be missing from the report with nothing to say so. Each
//! file says whether it holds the final figures.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::state::{set_bypass, FORKED, STATE};

/// How old the figures of a process that was killed can be.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// When this image started routing, for `wall_s`.
static STARTED: OnceLock<Instant> = OnceLock::new();
/// Where this image's figures go.
static PATH: OnceLock<PathBuf> = OnceLock::new();
/// This image's program (the first word of its command line).
static COMMAND: OnceLock<String> = OnceLock::new();
/// Held while a file is written; true once the final figures are, after which a snapshot
/// must not replace them.
static WRITING: Mutex<bool> = Mutex::new(false);

/// Starts writing this process's figures to `dir`: a snapshot thread now, the final figures
/// at exit.
pub(crate) fn start(dir: OsString) {
    STARTED.get_or_init(Instant::now);
    let image = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let _ = PATH.set(PathBuf::from(dir).join(format!("{}-{image}.json", std::process::id())));
    let command = std::fs::read("/proc/self/cmdline")
        .ok()
        .and_then(|c| c.split(|&b| b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned()))
        .unwrap_or_default();
    let _ = COMMAND.set(command);
    // SAFETY: registers a plain function with no captured state.
    unsafe { libc::atexit(write_final) };
    let spawned = clustermem_runtime::quiet_thread::spawn("clustermem-stats", || {
        // Its allocations (the report's text) must not land in cluster memory.
        set_bypass(true);
        loop {
            std::thread::sleep(SNAPSHOT_EVERY);
            if !write(false) {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        eprintln!(
            "clustermem: no figure snapshots (only the final figures at exit): cannot start a thread: {e}"
        );
    }
}

extern "C" fn write_final() {
    set_bypass(true);
    write(true);
}

/// Writes the figures now (atomically: a reader sees the old file or the new one). Returns
/// false once there is nothing more to write: the final figures are written, or this is a
/// forked child, whose parent's figures are not its own.
fn write(last: bool) -> bool {
    let (Some(st), Some(path)) = (STATE.get(), PATH.get()) else { return false };
    if FORKED.load(Relaxed) {
        return false;
    }
    let mut done = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return false;
    }
    let s = st.runtime.stats().snapshot();
    let wall = STARTED.get().map_or(Duration::ZERO, Instant::elapsed);
    let report = serde_json::json!({
        "pid": std::process::id(),
        "command": COMMAND.get(),
        "final": last,
        "wall_s": wall.as_secs_f64(),
        "size_bytes": st.high_water(),
        "faults": s.faults(),
        "remote_faults": s.remote_faults,
        "zero_faults": s.zero_faults,
        "rescued_faults": s.rescued_faults,
        "write_faults": s.write_faults,
        "service_p50_us": s.service_p50_us,
        "service_p99_us": s.service_p99_us,
        "pages_fetched": s.pages_fetched,
        "pages_evicted": s.pages_evicted,
        "pages_written_back": s.pages_written_back,
        "bytes_fetched": s.bytes_fetched,
        "bytes_written_back": s.bytes_written_back,
        "dirty_lines_written": s.dirty_lines_written,
        "page_granular_bytes": s.page_granular_bytes,
        "pages_flushed": s.pages_flushed,
        "tracking_scans": s.tracking_scans,
        "prefetch_issued": s.prefetch_issued,
        "prefetch_used": s.prefetch_used,
        "prefetch_wasted": s.prefetch_wasted,
        "region_error": st.region_error(),
    });
    let partial = path.with_extension("json.part");
    let written = std::fs::write(&partial, report.to_string()).and_then(|()| std::fs::rename(&partial, path));
    if let Err(e) = written {
        // Said once: the snapshot thread stops here, and the exit writes no more.
        eprintln!("clustermem: cannot write {}: {e}", path.display());
        *done = true;
        return false;
    }
    *done = last;
    true
}
