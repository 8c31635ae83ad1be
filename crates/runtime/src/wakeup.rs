//! The eventfd that wakes the fault handler out of its `poll`: written by `Runtime` handles
//! when they queue a command and by background threads when they have a result for it.
//! Shared (`Arc`), so the descriptor stays open while any writer may still use it: a writer
//! outliving the runtime (a redial taking its connect timeout) must not write into a
//! descriptor number reused by someone else.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

#[derive(Debug)]
pub(crate) struct Wakeup(OwnedFd);

impl Wakeup {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags; returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the handler's next (or current) `poll` return.
    pub(crate) fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd, open while `self` lives.
        unsafe { libc::write(self.0.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
    }

    /// Clears pending wakeups.
    pub(crate) fn drain(&self) {
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from our non-blocking eventfd.
        unsafe { libc::read(self.0.as_raw_fd(), std::ptr::addr_of_mut!(buf).cast(), 8) };
    }
}

impl AsRawFd for Wakeup {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
