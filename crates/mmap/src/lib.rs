//! Owned anonymous memory mappings: the one place clustermem calls `mmap` and `munmap`.
//!
//! Regions, host slabs, persistent-region images and benchmark baselines are all private
//! anonymous mappings with `MAP_NORESERVE` (memory is committed when touched, not when
//! mapped) and without transparent huge pages (faults, write protection and eviction work
//! per 4 KiB page; a huge page would make the kernel fill 2 MiB behind the pager's back).

use std::io;
use std::ptr::NonNull;

/// A private anonymous mapping, unmapped when dropped.
#[derive(Debug)]
pub struct AnonMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it hands out only raw pointers,
// and callers synchronise what they do through them.
unsafe impl Send for AnonMapping {}
// SAFETY: as above: `&AnonMapping` exposes nothing but the address and length.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to whole pages by the kernel) of zeroed memory.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map zero bytes"));
        }
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address aliases nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Best effort: THP may be off system-wide anyway.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
        let base = NonNull::new(base.cast()).expect("mmap never returns null on success");
        Ok(Self { base, len })
    }

    /// Start address (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` refuses zero bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; its owner is going away, and every borrow of
        // its memory is tied to the owner's lifetime.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_writable_page_aligned_memory() {
        let m = AnonMapping::new(3 * 4096).unwrap();
        assert_eq!(m.as_ptr() as usize % 4096, 0);
        // SAFETY: the mapping is 3 pages long and owned by `m`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[3 * 4096 - 1] = 9;
        assert_eq!(bytes[3 * 4096 - 1], 9);
        assert!(AnonMapping::new(0).is_err());
    }
}
