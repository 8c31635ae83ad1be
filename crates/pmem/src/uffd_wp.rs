//! Minimal userfaultfd bindings for write-protect tracking.
//!
//! Only what persistent regions need: open a userfaultfd, negotiate the API and check for
//! write-protect support, register a range in WP mode, protect / unprotect ranges, and read
//! fault messages. The kernel ABI is mirrored by hand (`#[repr(C)]` structs with size asserts,
//! ioctl numbers recomputed from their `_IOWR` formulas) so the crate needs no bindgen and no
//! `userfaultfd` crate, which lacks write-protect support.
//!
//! Where it stops working: `UFFDIO_WRITEPROTECT` silently skips PTEs that are not present, so
//! callers must register memory whose pages are all populated (see `tracker.rs`).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Errors from opening or driving a userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` syscall gave a descriptor.
    #[error(
        "userfaultfd is unavailable or not permitted (/dev/userfaultfd: {dev}; syscall: {syscall}); \
         run as root, or grant this user read/write access to /dev/userfaultfd, \
         or set `sysctl vm.unprivileged_userfaultfd=1`"
    )]
    Unavailable {
        /// Why opening `/dev/userfaultfd` failed.
        dev: io::Error,
        /// Why the syscall failed.
        syscall: io::Error,
    },
    /// The kernel refused the API handshake.
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    /// The kernel does not offer write-protect faults on anonymous memory (needs Linux >= 5.7).
    #[error("this kernel's userfaultfd lacks write-protect support (UFFD_FEATURE_PAGEFAULT_FLAG_WP; Linux >= 5.7 needed)")]
    NoWriteProtect,
    /// An ioctl on a range failed.
    #[error("{op} on range {start:#x}+{len:#x} failed")]
    Range {
        /// The ioctl's name.
        op: &'static str,
        /// Start address of the range.
        start: usize,
        /// Length of the range in bytes.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Reading fault messages failed.
    #[error("reading userfaultfd messages failed")]
    Read(#[source] io::Error),
}

// ---- kernel ABI (include/uapi/linux/userfaultfd.h) ----

const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;
/// `USERFAULTFD_IOC` for `/dev/userfaultfd`.
const USERFAULTFD_IOC: u32 = 0xAA;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults on anonymous memory.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_THREAD_ID`.
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;

const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// Bit of `_UFFDIO_WRITEPROTECT` in the `ioctls` mask returned by `UFFDIO_REGISTER`.
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Set in a page-fault message's flags when the fault hit a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_USER_MODE_ONLY` flag of `userfaultfd(2)`: enough for our faults, allowed to more users.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`, with the union flattened to its page-fault arm (the only event we enable).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `pagefault.flags`.
    pub flags: u64,
    /// `pagefault.address`.
    pub address: u64,
    /// `pagefault.feat.ptid` (or padding).
    ptid: u32,
    pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// Linux's generic `_IOC(dir, type, nr, size)` (x86_64, aarch64, riscv64).
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    #[expect(clippy::cast_possible_truncation, reason = "ioctl struct sizes are < 2^14")]
    let size = size as u32;
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOWR(UFFDIO, 0x3F, struct uffdio_api)` = 0xc018aa3f
const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, 24);
/// `_IOWR(UFFDIO, 0x00, struct uffdio_register)` = 0xc020aa00
const UFFDIO_REGISTER: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, 32);
/// `_IOR(UFFDIO, 0x01, struct uffdio_range)` = 0x8010aa01
const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, UFFDIO, 0x01, 16);
/// `_IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)` = 0xc018aa06
const UFFDIO_WRITEPROTECT: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x06, 24);
/// `_IO(USERFAULTFD_IOC, 0x00)` = 0xaa00
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, USERFAULTFD_IOC, 0x00, 0);

const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// A userfaultfd with write-protect support negotiated.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// Opens a userfaultfd (first `/dev/userfaultfd`, then the syscall) and negotiates the API,
    /// requiring write-protect faults on anonymous memory.
    pub fn open() -> Result<Self, UffdError> {
        let fd = open_fd()?;
        // Probe what the kernel offers, then ask for the features we use.
        let offered = api_handshake(&fd, 0).map_err(UffdError::Api)?;
        if offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::NoWriteProtect);
        }
        // The API can be negotiated only once per descriptor: open a fresh one for the real request.
        let fd = open_fd()?;
        let wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP | (offered & UFFD_FEATURE_THREAD_ID);
        let features = api_handshake(&fd, wanted).map_err(UffdError::Api)?;
        Ok(Self { fd, features })
    }

    /// The feature bits the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start+len)` for write-protect faults.
    ///
    /// # Safety
    /// The range must be a mapping owned by the caller for as long as it stays registered, and
    /// every write to it must be prepared to block until this descriptor's reader resolves the
    /// fault (a thread that writes the range and is also the only reader deadlocks).
    pub unsafe fn register_wp(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { range: range(start, len), mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes a `uffdio_register`, which `reg` is; the
        // caller guarantees the range is its own mapping.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if rc != 0 {
            return Err(range_err("UFFDIO_REGISTER", start, len));
        }
        if reg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
            return Err(UffdError::NoWriteProtect);
        }
        Ok(())
    }

    /// Unregisters a range registered with [`Uffd::register_wp`], waking any blocked writer.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut r = range(start, len);
        // SAFETY: UFFDIO_UNREGISTER reads a `uffdio_range`; unregistering never makes memory
        // unsafe to touch, it only stops fault delivery.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) };
        if rc != 0 {
            return Err(range_err("UFFDIO_UNREGISTER", start, len));
        }
        Ok(())
    }

    /// Write-protects a registered range (present PTEs only): the next write to each page
    /// faults to this descriptor's reader.
    pub fn protect(&self, start: usize, len: usize) -> Result<(), UffdError> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from a range and wakes the threads blocked on it.
    pub fn unprotect(&self, start: usize, len: usize) -> Result<(), UffdError> {
        self.writeprotect(start, len, 0)
    }

    /// Removes write protection without waking (for bulk work before a single wake).
    pub fn unprotect_nowake(&self, start: usize, len: usize) -> Result<(), UffdError> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    }

    fn writeprotect(&self, start: usize, len: usize, mode: u64) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect { range: range(start, len), mode };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads a `uffdio_writeprotect`; changing protection
            // of a registered range cannot break memory safety, only cause or resolve faults.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            // EAGAIN: the mm is changing under us (e.g. a concurrent mremap); retrying is what
            // the kernel asks for.
            if err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(UffdError::Range { op: "UFFDIO_WRITEPROTECT", start, len, source: err });
            }
        }
    }

    /// Reads pending fault messages into `buf` without blocking; returns how many were read.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> Result<usize, UffdError> {
        loop {
            // SAFETY: `buf` is valid for writes of `size_of_val(buf)` bytes, and `UffdMsg` is
            // plain data for which any bit pattern is valid.
            let n = unsafe {
                libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), std::mem::size_of_val(buf))
            };
            if n >= 0 {
                #[expect(clippy::cast_sign_loss, reason = "n >= 0 checked")]
                return Ok(n as usize / std::mem::size_of::<UffdMsg>());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(UffdError::Read(err)),
            }
        }
    }

    /// The raw descriptor, for `poll`.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

fn range(start: usize, len: usize) -> UffdioRange {
    UffdioRange { start: start as u64, len: len as u64 }
}

fn range_err(op: &'static str, start: usize, len: usize) -> UffdError {
    UffdError::Range { op, start, len, source: io::Error::last_os_error() }
}

/// Negotiates the API on a fresh descriptor asking for `features`; returns the granted
/// (or, with `features == 0`, the offered) feature bits.
fn api_handshake(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes a `uffdio_api`, which `api` is.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(api.features)
}

/// Opens a non-blocking, close-on-exec userfaultfd: `/dev/userfaultfd` first (its access is
/// controlled by file permissions), then the syscall. Non-blocking because `poll` may report
/// a fault that is gone by the time we read (resolved by another thread's unprotect): a
/// blocking read would then hang the handler.
fn open_fd() -> Result<OwnedFd, UffdError> {
    let dev = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument and
            // returns a new descriptor or -1.
            let fd = unsafe {
                libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC | libc::O_NONBLOCK)
            };
            if fd >= 0 {
                // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            io::Error::last_os_error()
        }
        Err(e) => e,
    };
    // SAFETY: the userfaultfd syscall takes one int of flags and returns a descriptor or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY)
    };
    if fd >= 0 {
        #[expect(clippy::cast_possible_truncation, reason = "descriptors fit in i32")]
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    Err(UffdError::Unavailable { dev, syscall: io::Error::last_os_error() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_negotiates_write_protect() {
        let uffd = Uffd::open().expect("userfaultfd with WP is available on the test machine");
        assert_ne!(uffd.features() & UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0);
    }

    #[test]
    fn unavailable_error_says_what_to_do() {
        let e = UffdError::Unavailable {
            dev: io::Error::from_raw_os_error(libc::EACCES),
            syscall: io::Error::from_raw_os_error(libc::EPERM),
        };
        let msg = e.to_string();
        assert!(msg.contains("vm.unprivileged_userfaultfd=1"), "{msg}");
        assert!(msg.contains("/dev/userfaultfd"), "{msg}");
    }
}
