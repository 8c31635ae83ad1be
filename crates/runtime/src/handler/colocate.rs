//! The fault handler runs on the CPU of the thread whose faults it serves.
//!
//! Installing a page wakes the faulting thread. Woken on another CPU, it waits for an
//! inter-processor interrupt and for whatever runs there (an embedded host's busy poll, on a
//! small machine) to give the CPU up: measured on a 2-vCPU VM, 5.4-7.9 us from the reply to
//! the thread running again, against 2.3-4.4 us with handler and thread on one CPU, where
//! the install hands the CPU straight back (`bench random --low-latency`, several pairs of
//! runs with a timing instrument; the floor's own loop lands on one CPU by itself). Without
//! busy-polling it matters more: a fault wakes a handler sleeping on the same CPU with no
//! interrupt, and the handler's reply wakes the thread the same way (`bench random`'s p50
//! 18-20 us against 27-31 us). The scheduler does not put the two together by itself, so
//! while one thread faults the handler follows it: every [`CHECK_EVERY`] it reads the CPU
//! the thread last ran on (field 39 of `/proc/self/task/TID/stat`) and narrows its own
//! affinity to it. Faults from several threads, a stream the prefetcher serves ahead of its
//! thread, or a CPU outside the handler's original set give it its original affinity back.

use std::time::{Duration, Instant};

/// How often the handler looks where its thread runs (a read of one small `/proc` file).
const CHECK_EVERY: Duration = Duration::from_millis(5);

/// Where the handler runs, and the one thread it follows.
pub(super) struct Colocation {
    /// The affinity the handler started with (restored when it stops following).
    original: libc::cpu_set_t,
    /// The CPU it is narrowed to, if any.
    pinned: Option<usize>,
    /// The thread of the faults since the last check, if they all came from one.
    thread: Option<u32>,
    several: bool,
    last_check: Instant,
    /// Remote faults and prefetched pages counted at the last check.
    seen: (u64, u64),
}

impl Colocation {
    /// The calling thread's current affinity is the set it may use; None if it cannot be read.
    pub(super) fn new() -> Option<Self> {
        // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
        let mut original: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `original` is a valid cpu_set_t of the size passed, written by the call.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut original) };
        (rc == 0).then(|| Self {
            original,
            pinned: None,
            thread: None,
            several: false,
            last_check: Instant::now(),
            seen: (0, 0),
        })
    }

    /// Thread `tid` faulted.
    pub(super) fn on_fault(&mut self, tid: u32) {
        match self.thread {
            None => self.thread = Some(tid),
            Some(t) if t != tid => self.several = true,
            Some(_) => {}
        }
    }

    /// Called when no thread waits on a fetch, with the runtime's counts of remote faults and
    /// prefetched pages so far: at most every [`CHECK_EVERY`], moves the handler to its
    /// thread's CPU, or back to its original set when several threads fault or when more
    /// pages came by prefetch than by fault. (A prefetched stream keeps the handler busy
    /// while its thread computes: on one CPU they took turns, and `bench seq-read` of 1 GiB
    /// at 25% took 0.91 s against 0.68 s, `seq-write` 2.19 s against 1.85 s.)
    pub(super) fn follow(&mut self, remote_faults: u64, prefetched: u64) {
        if self.last_check.elapsed() < CHECK_EVERY {
            return;
        }
        self.last_check = Instant::now();
        let (thread, several) = (self.thread.take(), std::mem::take(&mut self.several));
        // (Saturating: the counters start again from zero when the statistics are reset.)
        let (faulted, streamed) =
            (remote_faults.saturating_sub(self.seen.0), prefetched.saturating_sub(self.seen.1));
        self.seen = (remote_faults, prefetched);
        let target = match thread {
            // No fault since the last check: stay where we are.
            None => return,
            Some(_) if several || streamed > faulted => None,
            Some(tid) => last_cpu(tid).filter(|&cpu| self.allowed(cpu)),
        };
        if target == self.pinned {
            return;
        }
        let set = match target {
            Some(cpu) => {
                // SAFETY: an all-zero cpu_set_t is a valid (empty) set, and `cpu` is below
                // CPU_SETSIZE (`allowed` checked it).
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    set
                }
            }
            None => self.original,
        };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } == 0 {
            self.pinned = target;
        }
    }

    /// Whether the handler runs on its thread's CPU.
    pub(super) fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    fn allowed(&self, cpu: usize) -> bool {
        // SAFETY: `cpu` is below CPU_SETSIZE, so the bit lies inside the set.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.original) }
    }
}

/// The CPU thread `tid` of this process last ran on, from `/proc/self/task/TID/stat`.
fn last_cpu(tid: u32) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    parse_processor(&stat)
}

/// Field 39 (`processor`) of a `stat` line. The command name (field 2) is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_processor(stat: &str) -> Option<usize> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (state): field 39 is the 37th of it.
    rest.split_whitespace().nth(36)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_processor_field_is_found_after_any_command_name() {
        let fields_3_to_38: String = (3..=38).map(|i| format!(" {i}")).collect();
        for comm in ["bench", "a b) (c", ")"] {
            let line = format!("1234 ({comm}){fields_3_to_38} 7 0 0\n");
            assert_eq!(parse_processor(&line), Some(7), "{line}");
        }
        assert_eq!(parse_processor("1234 (short) S 1 2"), None);
        assert_eq!(parse_processor("no parenthesis"), None);
    }

    #[test]
    fn this_threads_cpu_is_read_from_proc() {
        // Pinned to the CPU it is on, the thread's `processor` field must name that CPU.
        let Some(c) = Colocation::new() else { panic!("sched_getaffinity failed") };
        // SAFETY: sched_getcpu and gettid take no arguments.
        let (cpu, tid) = unsafe { (libc::sched_getcpu() as usize, libc::gettid() as u32) };
        // SAFETY: an all-zero cpu_set_t is a valid (empty) set; `cpu` is a CPU number the
        // kernel gave, below CPU_SETSIZE; the sets passed are valid and of the size passed.
        unsafe {
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one), 0);
            std::thread::yield_now();
            assert_eq!(last_cpu(tid), Some(cpu));
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &c.original);
        }
    }

    #[test]
    fn one_faulting_thread_is_followed_and_several_or_a_prefetched_stream_are_not() {
        let Some(mut c) = Colocation::new() else { panic!("sched_getaffinity failed") };
        // SAFETY: gettid takes no arguments.
        let me = unsafe { libc::gettid() } as u32;
        c.on_fault(me);
        c.last_check -= CHECK_EVERY;
        c.follow(0, 0);
        let cpu = c.pinned.expect("one thread faulted: the handler follows it");
        // SAFETY: sched_getcpu takes no arguments.
        assert_eq!(unsafe { libc::sched_getcpu() } as usize, cpu, "runs on the CPU it is pinned to");
        // Counts are totals: 10 faults and 50 prefetched pages since the last check.
        c.on_fault(me);
        c.last_check -= CHECK_EVERY;
        c.follow(10, 50);
        assert_eq!(c.pinned, None, "more pages prefetched than faulted: not followed");
        c.on_fault(me);
        c.last_check -= CHECK_EVERY;
        c.follow(40, 60);
        assert!(c.pinned.is_some(), "30 faults against 10 prefetched pages: followed again");
        c.on_fault(me);
        c.last_check -= CHECK_EVERY;
        c.follow(0, 0);
        assert!(c.pinned.is_some(), "statistics reset to zero: no underflow, still followed");
        c.on_fault(me);
        c.on_fault(me + 1);
        c.last_check -= CHECK_EVERY;
        c.follow(40, 60);
        assert_eq!(c.pinned, None, "several threads: the original affinity is back");
        // SAFETY: as in `new`.
        let mut now: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `now` is a valid cpu_set_t of the size passed.
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut now) };
        // SAFETY: both are valid cpu_set_t values.
        assert!(unsafe { libc::CPU_EQUAL(&now, &c.original) });
    }
}
