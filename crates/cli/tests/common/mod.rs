//! Helpers for integration tests: real `clustermem host` processes on loopback, cleaned up
//! with SIGTERM then SIGKILL, and the `clustermem` binary with a timeout so a bug fails a
//! test instead of hanging the suite.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The byte a test writes at offset `i` of a region (a hash of `i`, so a page read back from
/// the wrong place or a stale copy shows).
pub fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 7) as u8
}

/// The fields of a `/proc/.../stat` line after the command name, from the state (field 3)
/// on: they follow the name's closing parenthesis (the name itself may hold parentheses).
pub fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect()
}

/// The state letter of a `/proc/.../stat` line (R, S, T, Z...).
pub fn process_state(stat: &str) -> Option<char> {
    stat_fields(stat).first()?.chars().next()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clustermem")
}

/// Fails the test with a clear message when userfaultfd cannot be used (e.g. not root).
pub fn require_userfaultfd() {
    if let Err(e) = clustermem_runtime::check_userfaultfd() {
        panic!("this test needs userfaultfd, which is unavailable here: {e}");
    }
}

/// A memory host process.
pub struct HostProcess {
    pub child: Child,
    pub addr: String,
}

impl HostProcess {
    /// Starts `clustermem host` on an ephemeral loopback port with `capacity`.
    pub fn start(capacity: &str) -> Self {
        Self::start_with(capacity, &[])
    }

    /// Starts `clustermem host` on an ephemeral loopback port with `capacity` and `extra` flags.
    pub fn start_with(capacity: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(bin())
            .args(["host", "--listen", "127.0.0.1:0", "--capacity", capacity])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning clustermem host");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("reading the host's banner");
        let addr = line
            .split(" on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected host banner {line:?}"))
            .to_string();
        // Keep draining stderr so the host never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Self { child, addr }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` to the host process, unless it has exited and been reaped (its pid may
    /// then belong to someone else).
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child process, which has not been reaped (checked above;
        // only this handle reaps it).
        unsafe { libc::kill(pid, signal) };
    }

    /// Stops the host (SIGSTOP) and waits until every one of its threads is stopped: the
    /// signal alone lands a moment later, and a request sent in between is still answered.
    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        let stopped = || {
            std::fs::read_dir(&tasks).expect("the host's tasks").all(|task| {
                let stat =
                    std::fs::read_to_string(task.expect("a task").path().join("stat")).unwrap_or_default();
                process_state(&stat) == Some('T')
            })
        };
        while !stopped() {
            assert!(Instant::now() < deadline, "the host did not stop within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate(Duration::from_secs(2));
            self.kill9();
        }
    }
}

/// Runs `clustermem ARGS`, killing it after `timeout`.
pub fn run_with_timeout(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    output_with_timeout(cmd, timeout)
}

/// Runs `cmd` to completion with its output captured, killing it and everything it started
/// (its own process group) after `timeout`, so no orphan keeps its output pipes open.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a test program");
    let pid = i32::try_from(child.id()).expect("pid");
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(timeout).is_err() {
            // SAFETY: kill(2) on our child's process group. The child is reaped only by
            // `wait_with_output`, after which `done` is sent within microseconds, against a
            // timeout of seconds.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("waiting for a test program");
    let _ = done.send(());
    let _ = watchdog.join();
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {text}"))
}
