//! A progress bar on stderr for phases that run longer than two seconds, drawn by a
//! background thread so workloads only bump a counter.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Shared {
    done: AtomicU64,
    total: AtomicU64,
    phase: Mutex<(&'static str, Instant)>,
    stop: AtomicBool,
}

/// Progress of the current phase; a no-op when disabled or stderr is not a terminal.
#[derive(Debug)]
pub(crate) struct Progress {
    shared: Option<Arc<Shared>>,
    drawer: Option<std::thread::JoinHandle<()>>,
}

const SHOW_AFTER: Duration = Duration::from_secs(2);

impl Progress {
    pub(crate) fn new(enabled: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { shared: None, drawer: None };
        }
        let shared = Arc::new(Shared {
            done: AtomicU64::new(0),
            total: AtomicU64::new(1),
            phase: Mutex::new(("", Instant::now())),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let drawer = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let mut drawn = false;
                while !s.stop.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let (name, since) = *s.phase.lock().unwrap_or_else(|e| e.into_inner());
                    if since.elapsed() < SHOW_AFTER {
                        continue;
                    }
                    let (done, total) = (s.done.load(Relaxed), s.total.load(Relaxed).max(1));
                    let frac = (done as f64 / total as f64).min(1.0);
                    let filled = (frac * 30.0) as usize;
                    eprint!(
                        "\r{name:>10} [{}{}] {:5.1}% {:6.1}s",
                        "#".repeat(filled),
                        " ".repeat(30 - filled),
                        frac * 100.0,
                        since.elapsed().as_secs_f64()
                    );
                    drawn = true;
                }
                if drawn {
                    eprint!("\r{}\r", " ".repeat(60));
                    let _ = std::io::stderr().flush();
                }
            })
            .ok();
        Self { shared: Some(shared), drawer }
    }

    /// Starts a phase of `total` units.
    pub(crate) fn phase(&self, name: &'static str, total: u64) {
        if let Some(s) = &self.shared {
            s.done.store(0, Relaxed);
            s.total.store(total, Relaxed);
            *s.phase.lock().unwrap_or_else(|e| e.into_inner()) = (name, Instant::now());
        }
    }

    /// Marks `n` more units done.
    pub(crate) fn advance(&self, n: u64) {
        if let Some(s) = &self.shared {
            s.done.fetch_add(n, Relaxed);
        }
    }

    /// Stops drawing and clears the bar.
    pub(crate) fn finish(&self) {
        if let Some(s) = &self.shared {
            s.stop.store(true, Relaxed);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
        if let Some(d) = self.drawer.take() {
            let _ = d.join();
        }
    }
}
