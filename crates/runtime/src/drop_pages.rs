//! Drops evicted pages from the local mapping: `MADV_DONTNEED` of many scattered runs in one
//! system call.
//!
//! Under random access eviction runs are one page long, and a round evicts two or three of
//! them (a fetched page and the twin of a written one both count against the limit). One
//! `madvise` per page cost 2.7 us a call on a 2-core VM (zap, free, TLB flush); one
//! `process_madvise(2)` on our own process (Linux 6.13+ accepts `MADV_DONTNEED` for self) for
//! the whole round cost 4.0 us for 2.8 pages on average: the handler's time in eviction
//! halved (ftrace of `bench random --low-latency`). Older kernels refuse it (`EINVAL`) and
//! the dropper falls back to one `madvise` per run for good.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::PAGE_SIZE;

/// Batches page runs and drops them together.
#[derive(Debug, Default)]
pub(crate) struct PageDropper {
    /// A pidfd of this process, opened at the first batch; `None` before it or after the
    /// kernel refused the call.
    pidfd: Option<OwnedFd>,
    /// `process_madvise` was refused (old kernel): use `madvise` from now on.
    unsupported: bool,
    runs: Vec<libc::iovec>,
}

// SAFETY: the iovecs only describe addresses (of mappings the runtime owns); nothing is
// dereferenced through them outside the system call made by the owning thread.
unsafe impl Send for PageDropper {}

/// The kernel's limit on iovecs per call (`UIO_MAXIOV`).
const MAX_RUNS: usize = 1024;

impl PageDropper {
    /// Drops the pages at `addrs` (page-aligned addresses in mappings the runtime owns), each
    /// run of adjacent pages as one range. Sorts `addrs`.
    ///
    /// # Safety
    ///
    /// Every address must be a page of a mapping that stays mapped for the call and whose
    /// contents the caller no longer needs (the next touch reads zeros or faults to us).
    pub(crate) unsafe fn drop_pages(&mut self, addrs: &mut [usize]) {
        addrs.sort_unstable();
        self.runs.clear();
        let mut i = 0;
        while i < addrs.len() {
            let mut n = 1;
            while i + n < addrs.len() && addrs[i + n] == addrs[i] + n * PAGE_SIZE {
                n += 1;
            }
            self.runs.push(libc::iovec { iov_base: addrs[i] as *mut libc::c_void, iov_len: n * PAGE_SIZE });
            i += n;
        }
        let mut start = 0;
        while start < self.runs.len() {
            let end = (start + MAX_RUNS).min(self.runs.len());
            // SAFETY: as this function's contract.
            unsafe { self.drop_runs(start, end) };
            start = end;
        }
    }

    /// # Safety
    ///
    /// As [`PageDropper::drop_pages`], for `self.runs[start..end]`.
    unsafe fn drop_runs(&mut self, start: usize, end: usize) {
        let fd = if end - start > 1 && !self.unsupported { self.pidfd() } else { None };
        let runs = &self.runs[start..end];
        if let Some(fd) = fd {
            // SAFETY: `runs` is a valid iovec array of `runs.len()` entries for the call; the
            // ranges are ours to drop (the caller's contract).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    fd,
                    runs.as_ptr(),
                    runs.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            let wanted: usize = runs.iter().map(|r| r.iov_len).sum();
            if usize::try_from(rc).is_ok_and(|done| done == wanted) {
                return;
            }
            let refused = matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EBADF)
            );
            if rc < 0 && refused {
                // The advice is not allowed (before 6.13) or the call is missing: never again.
                self.unsupported = true;
                self.pidfd = None;
            }
            // Otherwise (a partial drop, ENOMEM...): this batch goes through madvise below
            // (dropping a page twice is harmless).
        }
        for run in runs {
            // SAFETY: as this function's contract.
            let rc = unsafe { libc::madvise(run.iov_base, run.iov_len, libc::MADV_DONTNEED) };
            debug_assert_eq!(rc, 0);
        }
    }

    fn pidfd(&mut self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        if self.pidfd.is_none() {
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
            if fd < 0 {
                self.unsupported = true;
                return None;
            }
            // SAFETY: `fd` is a descriptor just opened and owned by nobody else.
            self.pidfd = Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        self.pidfd.as_ref().map(AsRawFd::as_raw_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_and_adjacent_pages_read_zero_after_a_drop_and_the_rest_keep_their_data() {
        drop_and_check(PageDropper::default());
    }

    #[test]
    fn without_process_madvise_the_fallback_drops_the_same_pages() {
        drop_and_check(PageDropper { unsupported: true, ..PageDropper::default() });
    }

    fn drop_and_check(mut dropper: PageDropper) {
        let pages = 64;
        let map = clustermem_mmap::AnonMapping::new(pages * PAGE_SIZE).unwrap();
        let base = map.as_ptr() as usize;
        for p in 0..pages {
            // SAFETY: page `p` lies inside the mapping.
            unsafe { std::ptr::write_bytes((base + p * PAGE_SIZE) as *mut u8, p as u8 + 1, PAGE_SIZE) };
        }
        let dropped = [3usize, 4, 5, 9, 20, 21, 40, 63];
        let mut addrs: Vec<usize> = dropped.iter().rev().map(|p| base + p * PAGE_SIZE).collect();
        // SAFETY: the pages are in `map`, which outlives the call; their data is not needed.
        unsafe { dropper.drop_pages(&mut addrs) };
        for p in 0..pages {
            // SAFETY: both bytes lie inside the mapping.
            let (first, last) = unsafe {
                (
                    *((base + p * PAGE_SIZE) as *const u8),
                    *((base + p * PAGE_SIZE + PAGE_SIZE - 1) as *const u8),
                )
            };
            let want = if dropped.contains(&p) { 0 } else { p as u8 + 1 };
            assert_eq!((first, last), (want, want), "page {p}");
        }
    }
}
