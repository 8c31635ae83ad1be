//! Threads of the runtime's own that never run the program's signal handlers.
//!
//! A signal sent to a process goes to any one of its threads that does not block it. A
//! program that blocks a signal in its threads (to take it with `sigwait`, or to leave it
//! pending) would otherwise have it delivered to one of ours and its handler run there: on
//! the fault handler's thread, a handler touching cluster memory would wait for the very
//! thread it runs on. So these threads start with every signal blocked (the synchronous
//! faults a thread causes itself are delivered regardless).

use std::io;
use std::thread::JoinHandle;

/// Spawns `f` on a new thread named `name` with every signal blocked. (The mask is inherited
/// from the spawning thread: it is blocked around the spawn and given back, so the new
/// thread cannot take a signal even before its first instruction.)
pub fn spawn<F, T>(name: &str, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: all-zero sigset_t values are valid, filled and written by the calls below.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: both sets are valid for the calls; pthread_sigmask changes only this thread's
    // mask, restored below whatever the spawn returned.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    // SAFETY: as above; `old` holds the mask read by the first call.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}
