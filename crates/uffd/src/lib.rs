//! Our own thin bindings over Linux userfaultfd and `PAGEMAP_SCAN`.
//!
//! Why not the `userfaultfd` crate: it lacks write-protect-on-copy, `WP_ASYNC` and
//! `PAGEMAP_SCAN`, and needs libclang to build. This crate mirrors the kernel ABI by hand
//! (`ioctls.rs`), detects features at run time from `UFFDIO_API`, and turns errno values into
//! domain outcomes at the wrapper (`EEXIST` from a copy is [`CopyOutcome::AlreadyPresent`],
//! and the faulting thread is woken, which skipping wedges a thread once in millions).
//!
//! Registering a range is the unsafe step (the kernel will hand its faults to us, and a page
//! of it may be replaced under the caller); copy, write-protect and wake are safe methods
//! because they only act on ranges that were registered.

mod ioctls;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use ioctls::*;
use thiserror::Error;

/// The page size this crate assumes (x86-64 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;

/// How often a move that found a page migrating (`EAGAIN`, nothing moved) is tried again.
const MOVE_RETRIES: u32 = 3;

/// Optional userfaultfd features (`UFFD_FEATURE_*`), as the kernel reports and grants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(u64);

impl Features {
    /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    pub const PAGEFAULT_FLAG_WP: Self = Self(1 << 0);
    /// Fault messages carry the faulting thread id.
    pub const THREAD_ID: Self = Self(1 << 8);
    /// Fault messages carry the exact faulting address, not just its page (Linux 5.18+).
    pub const EXACT_ADDRESS: Self = Self(1 << 11);
    /// `UFFDIO_WRITEPROTECT` also protects never-populated PTEs (Linux 6.4+).
    pub const WP_UNPOPULATED: Self = Self(1 << 13);
    /// `UFFDIO_POISON` is available (Linux 6.6+).
    pub const POISON: Self = Self(1 << 14);
    /// Write-protect faults are resolved by the kernel, which records them for
    /// `PAGEMAP_SCAN` (Linux 6.7+).
    pub const WP_ASYNC: Self = Self(1 << 15);
    /// `UFFDIO_MOVE` is available (Linux 6.8+).
    pub const MOVE: Self = Self(1 << 16);

    /// No optional feature.
    pub const fn empty() -> Self {
        Self(0)
    }
    /// Whether every feature in `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// The union of two sets.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    /// The raw `UFFD_FEATURE_*` bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
}

/// What a failed userfaultfd operation means, with what to do about it where we know.
#[derive(Debug, Error)]
pub enum UffdError {
    /// The kernel was built without userfaultfd.
    #[error("this kernel has no userfaultfd (needs Linux >= 5.7 built with CONFIG_USERFAULTFD)")]
    Unsupported,
    /// The caller may not create a userfaultfd that handles kernel-mode faults.
    #[error(
        "not permitted to use userfaultfd: run as root, or grant read-write access to \
         /dev/userfaultfd (e.g. `chmod 0666 /dev/userfaultfd` or a udev rule), or set \
         `sysctl vm.unprivileged_userfaultfd=1`"
    )]
    NotPermitted,
    /// `UFFDIO_API` failed.
    #[error("userfaultfd API handshake failed (requested features {requested:#x})")]
    Api {
        /// The feature bits asked for.
        requested: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks a feature this operation needs.
    #[error("this kernel's userfaultfd lacks {0} (a newer kernel is needed for it)")]
    MissingFeature(&'static str),
    /// Registering a range failed.
    #[error("UFFDIO_REGISTER of {len:#x} bytes at {addr:#x} failed")]
    Register {
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// An ioctl on a registered range failed.
    #[error("{op} of {len:#x} bytes at {addr:#x} failed")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The process that owned the registered memory is gone (`ESRCH`; `ENOSPC` from a copy
    /// before Linux 4.13).
    #[error("the address space behind the userfaultfd is gone")]
    Closed,
    /// Reading fault messages failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] io::Error),
}

impl UffdError {
    /// The errno of a failed ioctl on a registered range (`Ioctl`), else None.
    pub fn ioctl_errno(&self) -> Option<i32> {
        match self {
            Self::Ioctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Which faults a registered range reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMode {
    /// Report accesses to pages that are not present.
    pub missing: bool,
    /// Report writes to write-protected pages.
    pub write_protect: bool,
}

/// Result of a [`Uffd::copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The page was installed.
    Installed,
    /// Someone else installed it first; the waiters were woken.
    AlreadyPresent,
}

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page-aligned here) and sleeps until woken.
    PageFault {
        /// Page-aligned faulting address.
        addr: usize,
        /// The faulting address itself when `EXACT_ADDRESS` was granted, else `addr`.
        exact_addr: usize,
        /// The access was a write.
        write: bool,
        /// The fault is a write-protect fault (the page is present).
        write_protect: bool,
        /// Faulting thread id, when `THREAD_ID` was granted (else 0).
        tid: u32,
    },
    /// An event kind we did not ask for (the raw `UFFD_EVENT_*` code).
    Other(u8),
}

/// An open userfaultfd with its negotiated features.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

/// `ENOMEM` is not among the "gone" errors: a copy that cannot allocate or charge its page (a
/// memory cgroup at its limit) fails so, with the address space alive.
fn ioctl_error(op: &'static str, addr: usize, len: usize, source: io::Error) -> UffdError {
    match source.raw_os_error() {
        Some(libc::ESRCH | libc::ENOSPC) => UffdError::Closed,
        _ => UffdError::Ioctl { op, addr, len, source },
    }
}

/// Whether the page at `addr` is populated in this process: present or swapped out
/// (`/proc/self/pagemap` bits 63 and 62; `mincore` would miss a page swapped out). None if
/// the pagemap cannot be read.
fn page_populated(pagemap: &File, addr: usize) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, (addr / PAGE_SIZE * 8) as u64).ok()?;
    Some(u64::from_le_bytes(entry) >> 62 != 0)
}

/// Opens a raw userfaultfd: `/dev/userfaultfd` first (permission by file mode), then the
/// syscall (permission by capability or sysctl).
fn open_raw() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(dev) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd to us; nobody else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    // SAFETY: userfaultfd(2) takes flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(match last_err().raw_os_error() {
            Some(libc::ENOSYS) => UffdError::Unsupported,
            Some(libc::EPERM | libc::EACCES) => UffdError::NotPermitted,
            _ => UffdError::Api { requested: 0, source: last_err() },
        });
    }
    let fd = RawFd::try_from(fd).expect("fds fit in c_int");
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: &OwnedFd, requested: Features) -> Result<Features, UffdError> {
    let mut api = UffdioApi { api: UFFD_API, features: requested.bits(), ioctls: 0 };
    // SAFETY: `api` is a valid, writable uffdio_api that outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
    if rc < 0 {
        return Err(UffdError::Api { requested: requested.bits(), source: last_err() });
    }
    Ok(Features(api.features))
}

impl Uffd {
    /// The optional features this kernel offers (probed on a throwaway descriptor, since
    /// `UFFDIO_API` may be called only once per descriptor).
    pub fn available_features() -> Result<Features, UffdError> {
        api(&open_raw()?, Features::empty())
    }

    /// Opens a non-blocking userfaultfd and asks for `requested` features, failing with
    /// [`UffdError::MissingFeature`] if the kernel lacks one.
    pub fn open(requested: Features) -> Result<Self, UffdError> {
        let available = Self::available_features()?;
        if !available.contains(requested) {
            let missing = requested.bits() & !available.bits();
            let name = if missing & Features::WP_ASYNC.bits() != 0 {
                "UFFD_FEATURE_WP_ASYNC (Linux 6.7+)"
            } else if missing & Features::WP_UNPOPULATED.bits() != 0 {
                "UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)"
            } else if missing & Features::PAGEFAULT_FLAG_WP.bits() != 0 {
                "write-protect support (Linux 5.7+)"
            } else {
                "a requested feature"
            };
            return Err(UffdError::MissingFeature(name));
        }
        let fd = open_raw()?;
        let features = api(&fd, requested)?;
        Ok(Self { fd, features })
    }

    /// The features granted to this descriptor.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Registers `[addr, addr + len)` so its faults are reported to this descriptor.
    ///
    /// # Safety
    ///
    /// The range must be a private anonymous mapping owned by the caller for as long as it
    /// stays registered, and the caller must serve its faults: an unserved fault blocks the
    /// faulting thread forever, and copies through this descriptor replace its pages.
    pub unsafe fn register(&self, addr: usize, len: usize, mode: RegisterMode) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr as u64, len: len as u64 },
            mode: if mode.missing { UFFDIO_REGISTER_MODE_MISSING } else { 0 }
                | if mode.write_protect { UFFDIO_REGISTER_MODE_WP } else { 0 },
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid uffdio_register that outlives the call; the caller vouches
        // for the range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if rc < 0 {
            return Err(UffdError::Register { addr, len, source: last_err() });
        }
        Ok(())
    }

    /// Stops reporting faults for a range (before it is unmapped or handed back).
    pub fn unregister(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut range = UffdioRange { start: addr as u64, len: len as u64 };
        // SAFETY: `range` is a valid uffdio_range; unregistering never touches memory.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
        self.check("UFFDIO_UNREGISTER", rc, addr, len)
    }

    fn check(&self, op: &'static str, rc: libc::c_int, addr: usize, len: usize) -> Result<(), UffdError> {
        if rc >= 0 {
            return Ok(());
        }
        Err(ioctl_error(op, addr, len, last_err()))
    }

    /// Atomically installs `src` (a whole number of pages) at the page-aligned `dst` of a
    /// registered range, write-protected if `write_protect`, and wakes threads waiting there
    /// unless `wake` is false.
    pub fn copy(
        &self,
        dst: usize,
        src: &[u8],
        write_protect: bool,
        wake: bool,
    ) -> Result<CopyOutcome, UffdError> {
        debug_assert!(dst.is_multiple_of(PAGE_SIZE) && src.len().is_multiple_of(PAGE_SIZE));
        let mut done = 0;
        while done < src.len() {
            let mut copy = UffdioCopy {
                dst: (dst + done) as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: if write_protect { UFFDIO_COPY_MODE_WP } else { 0 }
                    | if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
                copy: 0,
            };
            // SAFETY: `copy` is valid for the call; `src` is readable for `len` bytes; the
            // destination is in a range registered through the unsafe `register`.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
            if rc < 0 {
                match last_err().raw_os_error() {
                    Some(libc::EEXIST) => {
                        // The page is there already: waiters must still be woken.
                        self.wake(dst, src.len())?;
                        return Ok(CopyOutcome::AlreadyPresent);
                    }
                    // A partial copy: the kernel reports how much it did in `copy`.
                    Some(libc::EAGAIN) if copy.copy > 0 => {}
                    _ => self.check("UFFDIO_COPY", rc, dst + done, src.len() - done)?,
                }
            }
            let copied = usize::try_from(copy.copy).unwrap_or(0);
            if rc >= 0 && copied == 0 {
                break;
            }
            done += copied;
        }
        Ok(CopyOutcome::Installed)
    }

    /// Sets (`protect`) or clears write protection on a range of present pages. Clearing it
    /// wakes threads blocked on a write-protect fault there unless `wake` is false; `wake`
    /// does not matter when protecting.
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool, wake: bool) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start: addr as u64, len: len as u64 },
            // The kernel rejects DONTWAKE together with WP (protecting wakes nobody anyway).
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else if wake {
                0
            } else {
                UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            },
        };
        // SAFETY: `wp` is a valid uffdio_writeprotect; changing protection never writes memory.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
        self.check("UFFDIO_WRITEPROTECT", rc, addr, len)
    }

    /// Atomically moves the pages `src..src + len` to `dst` (missing pages of a range
    /// registered with this userfaultfd), leaving `src` missing: a thread touching `src`
    /// afterwards faults to whoever serves it, and no store can land in a page after it left.
    /// Returns how many bytes were moved, from the start, and why the rest were not (e.g.
    /// `EBUSY` for a page shared with another process after a `fork`). A page caught
    /// migrating (`EAGAIN` with nothing moved) is tried again a few times. Needs
    /// `UFFD_FEATURE_MOVE` (Linux 6.8+).
    ///
    /// A move the kernel made but reported as `EEXIST` is counted as made: Linux 6.18 was
    /// seen (4 times in 40 runs of a stress test with writers storing into the pages being
    /// moved) to move a page, then fail with `EEXIST` for it, the page gone from `src` and
    /// present at `dst`. Since `dst` was empty, a page now absent at the source and present
    /// (or swapped out) at the destination can only have been moved (`/proc/self/pagemap`
    /// tells, read only on this error path).
    ///
    /// # Safety
    ///
    /// `src..src + len` must be memory whose contents the caller owns and whose later faults
    /// it serves (a range registered on this userfaultfd): the kernel only checks that `src`
    /// is private anonymous memory of this process, so moving out any other memory would
    /// leave its users reading zeros. `dst..dst + len` must hold no pages (else the check
    /// above would take a page already there for a moved one).
    pub unsafe fn move_pages(&self, dst: usize, src: usize, len: usize) -> (usize, Result<(), UffdError>) {
        debug_assert!(dst.is_multiple_of(PAGE_SIZE) && src.is_multiple_of(PAGE_SIZE));
        let mut done = 0;
        let mut retries = 0;
        while done < len {
            let mut mv = UffdioMove {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: UFFDIO_MOVE_MODE_DONTWAKE,
                moved: 0,
            };
            // SAFETY: `mv` is a valid uffdio_move; the kernel checks that `dst` lies in a
            // range registered with this userfaultfd and that both ranges are private
            // anonymous memory of this process; the caller vouches for `src` (see above).
            // Nobody waits on a present page, so nobody needs waking.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE as _, &mut mv) };
            // On failure `moved` holds the bytes moved before it, or a negative errno.
            let moved = usize::try_from(mv.moved).unwrap_or(0);
            if rc < 0 {
                let err = last_err();
                let errno = err.raw_os_error();
                let again = errno == Some(libc::EAGAIN);
                if again && moved == 0 && retries < MOVE_RETRIES {
                    retries += 1;
                    continue;
                }
                let at = done + moved;
                if errno == Some(libc::EEXIST) {
                    let made = File::open("/proc/self/pagemap").map_or(0, |pagemap| {
                        let populated = |a| page_populated(&pagemap, a);
                        (at..len)
                            .step_by(PAGE_SIZE)
                            .take_while(|&o| {
                                populated(src + o) == Some(false) && populated(dst + o) == Some(true)
                            })
                            .count()
                    });
                    if made > 0 {
                        done = at + made * PAGE_SIZE;
                        continue;
                    }
                }
                if !(again && moved > 0) {
                    return (at, Err(ioctl_error("UFFDIO_MOVE", src + at, len - at, err)));
                }
            }
            if moved == 0 {
                break;
            }
            done += moved;
        }
        (done, Ok(()))
    }

    /// Marks missing pages of a range as lost: a thread touching them gets `SIGBUS` instead
    /// of waiting forever, and waiters are woken to take it. Needs `UFFD_FEATURE_POISON`
    /// (Linux 6.6+).
    pub fn poison(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut poison =
            UffdioPoison { range: UffdioRange { start: addr as u64, len: len as u64 }, mode: 0, updated: 0 };
        // SAFETY: `poison` is a valid uffdio_poison; the range was registered through the
        // unsafe `register`, and poisoning only fills missing PTEs with markers.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON as _, &mut poison) };
        match self.check("UFFDIO_POISON", rc, addr, len) {
            Err(e) if e.ioctl_errno() == Some(libc::EEXIST) => self.wake(addr, len),
            other => other,
        }
    }

    /// Wakes threads that fault in a range (after it was served some other way).
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut range = UffdioRange { start: addr as u64, len: len as u64 };
        // SAFETY: `range` is a valid uffdio_range; waking never touches memory.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        self.check("UFFDIO_WAKE", rc, addr, len)
    }

    /// Reads as many pending events as fit in `out`, without blocking. Returns how many were
    /// read (0 when none is pending).
    pub fn read_events(&self, out: &mut [Event]) -> Result<usize, UffdError> {
        const BATCH: usize = 64;
        // Not zeroed: a spinning handler calls this in a tight loop, mostly to find nothing.
        let mut raw = [std::mem::MaybeUninit::<UffdMsg>::uninit(); BATCH];
        let want = out.len().min(BATCH);
        // SAFETY: `raw` is writable for `want` messages; read(2) writes at most that many bytes.
        let n = unsafe {
            libc::read(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), want * std::mem::size_of::<UffdMsg>())
        };
        if n < 0 {
            let err = last_err();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) => Ok(0),
                _ => Err(UffdError::Read(err)),
            };
        }
        let count = n.unsigned_abs() / std::mem::size_of::<UffdMsg>();
        for (slot, msg) in out.iter_mut().zip(&raw[..count]) {
            // SAFETY: the kernel wrote `count` whole messages at the front of `raw`.
            let msg = unsafe { msg.assume_init_ref() };
            *slot = if msg.event == UFFD_EVENT_PAGEFAULT {
                let exact_addr = usize::try_from(msg.pf_address).expect("addresses fit usize");
                Event::PageFault {
                    addr: exact_addr & !(PAGE_SIZE - 1),
                    exact_addr,
                    write: msg.pf_flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    write_protect: msg.pf_flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                    tid: msg.pf_ptid,
                }
            } else {
                Event::Other(msg.event)
            };
        }
        Ok(count)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Finds pages written since they were last write-protected, through `PAGEMAP_SCAN` on
/// `/proc/self/pagemap` (Linux 6.7+, with a `WP_ASYNC` userfaultfd on the range).
#[derive(Debug)]
pub struct PagemapScanner {
    pagemap: File,
    regions: Vec<PageRegion>,
}

impl PagemapScanner {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        Ok(Self { pagemap: File::open("/proc/self/pagemap")?, regions: vec![PageRegion::default(); 512] })
    }

    /// Calls `found(start, end)` for each run of pages in `[start, end)` written since their
    /// last protection (present, or swapped out or migrating since); with `reprotect`,
    /// atomically write-protects them again so the next scan sees only newer writes.
    pub fn scan_written(
        &mut self,
        start: usize,
        end: usize,
        reprotect: bool,
        found: impl FnMut(usize, usize),
    ) -> Result<(), UffdError> {
        self.scan_written_upto(start, end, reprotect, usize::MAX, found).map(|_| ())
    }

    /// As [`PagemapScanner::scan_written`], stopping once `max_pages` written pages were
    /// found (and, with `reprotect`, protected): returns where the walk stopped (`end` if it
    /// got there), for the next call to go on from.
    pub fn scan_written_upto(
        &mut self,
        start: usize,
        end: usize,
        reprotect: bool,
        max_pages: usize,
        mut found: impl FnMut(usize, usize),
    ) -> Result<usize, UffdError> {
        let mut cursor = start;
        let mut left = max_pages;
        while cursor < end && left > 0 {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: if reprotect { PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC } else { 0 },
                start: cursor as u64,
                end: end as u64,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: if left == usize::MAX { 0 } else { left as u64 },
                // Written, and there: present, or swapped out or migrating (compaction) at
                // the moment, which is written all the same and must not read as clean.
                // (Never-populated PTEs count as "written" too; they are not wanted.)
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` is valid; `vec` points at `vec_len` writable page_regions that
            // outlive the call.
            let rc = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if rc < 0 {
                return Err(UffdError::Ioctl {
                    op: "PAGEMAP_SCAN",
                    addr: cursor,
                    len: end - cursor,
                    source: last_err(),
                });
            }
            let n = usize::try_from(rc).expect("non-negative");
            for r in &self.regions[..n] {
                found(r.start as usize, r.end as usize);
                if left != usize::MAX {
                    left -= usize::try_from((r.end - r.start) / PAGE_SIZE as u64).expect("fits").min(left);
                }
            }
            let walked = usize::try_from(arg.walk_end).expect("addresses fit usize");
            if walked <= cursor {
                break;
            }
            cursor = walked;
        }
        Ok(cursor.min(end))
    }
}

#[cfg(test)]
mod tests_support {
    pub(crate) fn map(len: usize) -> usize {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    fn need_uffd() -> Uffd {
        Uffd::open(Features::empty()).unwrap_or_else(|e| panic!("userfaultfd is needed for this test: {e}"))
    }

    /// Only the errors of an exited address space say it is gone; out of memory (a cgroup at
    /// its limit) is an ordinary failure with its cause kept.
    #[test]
    fn only_an_exited_address_space_reads_as_closed() {
        let err = |errno| ioctl_error("UFFDIO_COPY", 0x1000, 4096, io::Error::from_raw_os_error(errno));
        assert!(matches!(err(libc::ESRCH), UffdError::Closed));
        assert!(matches!(err(libc::ENOSPC), UffdError::Closed));
        let oom = err(libc::ENOMEM);
        assert_eq!(oom.ioctl_errno(), Some(libc::ENOMEM), "{oom}");
        assert_eq!(err(libc::EEXIST).ioctl_errno(), Some(libc::EEXIST));
    }

    /// A fault from another thread is reported, served by a copy, and the reader sees the
    /// copied bytes.
    #[test]
    fn missing_fault_is_served_by_copy() {
        let uffd = need_uffd();
        let base = map(4 * PAGE_SIZE);
        // SAFETY: the mapping is ours and we serve its faults below.
        unsafe { uffd.register(base, 4 * PAGE_SIZE, RegisterMode { missing: true, write_protect: false }) }
            .unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: the page is mapped; the read blocks until the handler installs it.
            unsafe { std::ptr::read_volatile((base + 2 * PAGE_SIZE + 5) as *const u8) }
        });
        let mut events = [Event::Other(0); 4];
        let fault = loop {
            let n = uffd.read_events(&mut events).unwrap();
            if n > 0 {
                break events[0];
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let Event::PageFault { addr, write, write_protect, .. } = fault else { panic!("{fault:?}") };
        assert_eq!(addr, base + 2 * PAGE_SIZE);
        assert!(!write && !write_protect);
        let page = vec![0xA5u8; PAGE_SIZE];
        assert_eq!(uffd.copy(addr, &page, false, true).unwrap(), CopyOutcome::Installed);
        assert_eq!(reader.join().unwrap(), 0xA5);
        // A second copy onto the same page is reported, not an error.
        assert_eq!(uffd.copy(addr, &page, false, true).unwrap(), CopyOutcome::AlreadyPresent);
    }

    /// A page installed write-protected reports the first write, and unprotecting lets it in.
    #[test]
    fn write_protected_copy_reports_first_write() {
        let uffd = need_uffd();
        let base = map(PAGE_SIZE);
        // SAFETY: the mapping is ours and we serve its faults below.
        unsafe { uffd.register(base, PAGE_SIZE, RegisterMode { missing: true, write_protect: true }) }
            .unwrap();
        uffd.copy(base, &vec![1u8; PAGE_SIZE], true, true).unwrap();
        let writer = std::thread::spawn(move || {
            // SAFETY: the page is mapped and present; the write blocks until unprotected.
            unsafe { std::ptr::write_volatile((base + 7) as *mut u8, 9) };
        });
        let mut events = [Event::Other(0); 1];
        while uffd.read_events(&mut events).unwrap() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(matches!(events[0], Event::PageFault { write: true, write_protect: true, .. }));
        uffd.write_protect(base, PAGE_SIZE, false, true).unwrap();
        writer.join().unwrap();
        // SAFETY: the page is present and no other thread writes it any more.
        assert_eq!(unsafe { std::ptr::read_volatile((base + 7) as *const u8) }, 9);
    }
}

#[cfg(test)]
mod async_tests {
    use super::tests_support::*;
    use super::*;

    fn written(scan: &mut PagemapScanner, base: usize, pages: usize, reprotect: bool) -> Vec<usize> {
        let mut found = Vec::new();
        scan.scan_written(base, base + pages * PAGE_SIZE, reprotect, |s, e| {
            found.extend((s..e).step_by(PAGE_SIZE).map(|a| (a - base) / PAGE_SIZE));
        })
        .unwrap();
        found
    }

    /// A scan bounded to N pages protects and reports only those, and says where to go on.
    #[test]
    fn bounded_scans_resume_where_they_stopped() {
        let wanted = Features::WP_ASYNC.union(Features::PAGEFAULT_FLAG_WP);
        let uffd = Uffd::open(wanted).unwrap_or_else(|e| panic!("Linux 6.7+ userfaultfd is needed: {e}"));
        let base = map(8 * PAGE_SIZE);
        // SAFETY: the mapping is ours; every page is installed below, so nothing faults.
        unsafe { uffd.register(base, 8 * PAGE_SIZE, RegisterMode { missing: true, write_protect: true }) }
            .unwrap();
        uffd.copy(base, &vec![0u8; 8 * PAGE_SIZE], false, true).unwrap();
        let mut scan = PagemapScanner::open().unwrap();
        let end = base + 8 * PAGE_SIZE;
        let mut found = Vec::new();
        let stop =
            scan.scan_written_upto(base, end, true, 3, |s, e| found.push((s - base, e - base))).unwrap();
        assert_eq!((found.as_slice(), stop), (&[(0, 3 * PAGE_SIZE)][..], base + 3 * PAGE_SIZE));
        assert_eq!(written(&mut scan, base, 8, false), [3, 4, 5, 6, 7], "only the three were protected");
        found.clear();
        let stop =
            scan.scan_written_upto(stop, end, true, 100, |s, e| found.push((s - base, e - base))).unwrap();
        assert_eq!((found.as_slice(), stop), (&[(3 * PAGE_SIZE, 8 * PAGE_SIZE)][..], end));
    }

    /// The contract async dirty tracking relies on: a page installed writable counts as
    /// written, a protected one only once stored to (with no fault to serve), a reprotecting
    /// scan clears that, and a move takes the page out so the next touch faults as missing.
    #[test]
    fn async_write_protect_scan_and_move() {
        let wanted = Features::WP_ASYNC.union(Features::MOVE).union(Features::PAGEFAULT_FLAG_WP);
        let uffd = Uffd::open(wanted).unwrap_or_else(|e| panic!("Linux 6.8+ userfaultfd is needed: {e}"));
        let both = RegisterMode { missing: true, write_protect: true };
        let base = map(4 * PAGE_SIZE);
        let staging = map(4 * PAGE_SIZE);
        // SAFETY: both mappings are ours; faults on them are served below.
        unsafe { uffd.register(base, 4 * PAGE_SIZE, both) }.unwrap();
        // SAFETY: as above.
        unsafe { uffd.register(staging, 4 * PAGE_SIZE, both) }.unwrap();
        uffd.copy(base, &vec![1u8; PAGE_SIZE], true, true).unwrap();
        uffd.copy(base + PAGE_SIZE, &vec![2u8; PAGE_SIZE], false, true).unwrap();
        let mut scan = PagemapScanner::open().unwrap();
        assert_eq!(written(&mut scan, base, 4, false), [1], "installed writable counts as written");
        // SAFETY: page 0 is present; async protection lets the store in without a fault.
        unsafe { std::ptr::write_volatile((base + 3) as *mut u8, 9) };
        assert_eq!(written(&mut scan, base, 4, true), [0, 1]);
        assert_eq!(written(&mut scan, base, 4, false), [0usize; 0], "the scan protected them again");
        let mut events = [Event::Other(0); 1];
        assert_eq!(uffd.read_events(&mut events).unwrap(), 0, "no fault reached us");

        // SAFETY: both pages are this test's, registered on `uffd`; it serves the fault below.
        let (moved, result) = unsafe { uffd.move_pages(staging, base, 2 * PAGE_SIZE) };
        result.unwrap();
        assert_eq!(moved, 2 * PAGE_SIZE);
        // SAFETY: the staging pages were just moved in, present and readable.
        assert_eq!(unsafe { std::ptr::read_volatile((staging + 3) as *const u8) }, 9);
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile((staging + PAGE_SIZE) as *const u8) }, 2);
        let reader = std::thread::spawn(move || {
            // SAFETY: mapped; the read blocks until we install the page below.
            unsafe { std::ptr::read_volatile((base + 5) as *const u8) }
        });
        while uffd.read_events(&mut events).unwrap() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(matches!(events[0], Event::PageFault { addr, write_protect: false, .. } if addr == base));
        uffd.copy(base, &vec![5u8; PAGE_SIZE], true, true).unwrap();
        assert_eq!(reader.join().unwrap(), 5);
    }

    /// A move onto a destination page that is really there is refused (`EEXIST`) and not
    /// taken for one the kernel made (the check for its misreports needs the source gone).
    #[test]
    fn a_move_onto_an_occupied_page_is_refused() {
        let wanted = Features::MOVE;
        let uffd = Uffd::open(wanted).unwrap_or_else(|e| panic!("Linux 6.8+ userfaultfd is needed: {e}"));
        let missing = RegisterMode { missing: true, write_protect: false };
        let (base, staging) = (map(2 * PAGE_SIZE), map(2 * PAGE_SIZE));
        // SAFETY: both mappings are ours and every page touched below is installed first.
        unsafe { uffd.register(base, 2 * PAGE_SIZE, missing) }.unwrap();
        // SAFETY: as above.
        unsafe { uffd.register(staging, 2 * PAGE_SIZE, missing) }.unwrap();
        uffd.copy(base, &vec![1u8; 2 * PAGE_SIZE], false, true).unwrap();
        uffd.copy(staging + PAGE_SIZE, &vec![7u8; PAGE_SIZE], false, true).unwrap();
        // SAFETY: the source pages are this test's, installed above.
        let (moved, result) = unsafe { uffd.move_pages(staging, base, 2 * PAGE_SIZE) };
        assert_eq!(moved, PAGE_SIZE, "the first page moved, the second found its slot taken");
        let Err(UffdError::Ioctl { source, addr, .. }) = result else { panic!("{result:?}") };
        assert_eq!((source.raw_os_error(), addr), (Some(libc::EEXIST), base + PAGE_SIZE));
        // SAFETY: both pages are present (the second was not moved).
        let (left, there) = unsafe {
            (
                std::ptr::read_volatile((base + PAGE_SIZE) as *const u8),
                std::ptr::read_volatile((staging + PAGE_SIZE) as *const u8),
            )
        };
        assert_eq!((left, there), (1, 7));
    }
}
