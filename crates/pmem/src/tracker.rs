//! Finding the pages a transaction writes: a private anonymous mapping, write-protected with
//! userfaultfd, and a handler thread that saves a clean twin of each page on its first write.
//!
//! Why an anonymous mapping filled from the pool file, not a `MAP_PRIVATE` file mapping: a
//! read fault on a private file mapping installs the page-cache page read-only, and
//! `UFFDIO_WRITEPROTECT` silently skips PTEs that are not present; copying the pool into
//! anonymous memory at open makes every PTE present and private, so protecting the whole range
//! once really protects every page. It costs one read of the pool at open and RAM equal to the
//! region.
//!
//! Pages stay write-protected between transactions. A write fault (from any thread) is served by
//! the `pmem-uffd` thread: it copies the still-unchanged page into a twin, then unprotects the
//! page, which wakes the writer. Commit diffs each written page against its twin and
//! re-protects it; abort copies the twin back. A write made outside a transaction (through a
//! raw pointer) is tracked the same way and so joins the next transaction: committed with it or
//! rolled back by its abort.
//!
//! Where it stops working: each first write to a page in a transaction costs a fault round trip
//! to the handler thread (several microseconds, tens on a busy VM), so transactions that touch
//! thousands of pages pay more than the log write. Huge pages are disabled on the mapping to
//! keep the tracking granularity at one base page.

use clustermem_mmap::AnonMapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::uffd_wp::{Uffd, UffdError, UffdMsg, UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP};

/// Errors setting up write tracking.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// `mmap` of the region failed.
    #[error("mapping {bytes} bytes of anonymous memory failed")]
    Map {
        /// Requested size.
        bytes: usize,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// userfaultfd setup or an ioctl failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Starting the handler thread failed.
    #[error("starting the userfaultfd handler thread failed")]
    Thread(#[source] std::io::Error),
}

/// The tracked image: a private anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping(AnonMapping);

impl Mapping {
    fn new(len: usize) -> Result<Self, TrackError> {
        AnonMapping::new(len).map(Self).map_err(|source| TrackError::Map { bytes: len, source })
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.0.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

const NO_TWIN: u32 = u32::MAX;

/// Pages written since the last commit or abort, with their clean twins.
#[derive(Debug)]
pub(crate) struct Dirty {
    page_bytes: usize,
    /// Per page: index of its twin in `twins`, or `NO_TWIN`.
    twin_of: Vec<u32>,
    /// Written pages in fault order.
    pages: Vec<u32>,
    /// Twin copies, `page_bytes` each, in the order of `pages`.
    twins: Vec<u8>,
}

impl Dirty {
    /// Written pages.
    pub(crate) fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// The clean twin of `page` if it was written.
    pub(crate) fn twin(&self, page: u32) -> Option<&[u8]> {
        let slot = *self.twin_of.get(page as usize)?;
        (slot != NO_TWIN).then(|| {
            let at = slot as usize * self.page_bytes;
            &self.twins[at..at + self.page_bytes]
        })
    }

    fn record(&mut self, page: u32, contents: &[u8]) {
        if self.twin_of[page as usize] != NO_TWIN {
            return;
        }
        self.twin_of[page as usize] = u32::try_from(self.pages.len()).expect("fewer than 2^32 pages");
        self.pages.push(page);
        self.twins.extend_from_slice(contents);
    }

    /// Forgets every page (keeps the buffers).
    pub(crate) fn clear(&mut self) {
        for &p in &self.pages {
            self.twin_of[p as usize] = NO_TWIN;
        }
        self.pages.clear();
        self.twins.clear();
    }
}

struct Shared {
    map: Mapping,
    uffd: Uffd,
    page_bytes: usize,
    dirty: Mutex<Dirty>,
    faults: AtomicU64,
    /// Set if the handler thread failed; writers were released by unregistering.
    failed: Mutex<Option<String>>,
}

/// A write-tracked region of memory.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("base", &format_args!("{:#x}", self.shared.map.base() as usize))
            .field("len", &self.shared.map.len())
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// Maps `len` bytes, lets `fill` initialise them (every byte must be written so every PTE
    /// is present), then write-protects the whole range and starts the handler thread.
    pub(crate) fn new<E: From<TrackError>>(
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        // SAFETY: sysconf has no preconditions.
        let page_bytes = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let uffd = Uffd::open().map_err(TrackError::from)?;
        let map = Mapping::new(len)?;
        // Populate every PTE up front (Linux >= 5.14; `fill` writing every byte does it too).
        // SAFETY: advice on our own fresh mapping; failure is harmless.
        unsafe { libc::madvise(map.base().cast(), len, libc::MADV_POPULATE_WRITE) };
        // SAFETY: the mapping is fresh, exclusively ours, and not yet shared with any thread.
        fill(unsafe { std::slice::from_raw_parts_mut(map.base(), len) })?;
        let base = map.base() as usize;
        // SAFETY: the range is our own mapping, kept alive by `Shared` until after it is
        // unregistered (in `Drop`); writers block only until the handler thread (started below,
        // before any protection exists) serves them.
        unsafe { uffd.register_wp(base, len) }.map_err(TrackError::from)?;
        uffd.protect(base, len).map_err(TrackError::from)?;
        let pages = len / page_bytes;
        let dirty = Dirty { page_bytes, twin_of: vec![NO_TWIN; pages], pages: Vec::new(), twins: Vec::new() };
        let shared = Arc::new(Shared {
            map,
            uffd,
            page_bytes,
            dirty: Mutex::new(dirty),
            faults: AtomicU64::new(0),
            failed: Mutex::new(None),
        });
        // SAFETY: eventfd has no memory preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(TrackError::Thread(std::io::Error::last_os_error()).into());
        }
        // SAFETY: `efd` is a fresh descriptor owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_raw = stop.as_raw_fd();
        let s = Arc::clone(&shared);
        let handler = std::thread::Builder::new()
            .name("pmem-uffd".into())
            .spawn(move || handler_loop(&s, stop_raw))
            .map_err(TrackError::Thread)?;
        Ok(Self { shared, stop, handler: Some(handler) })
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.shared.map.base()
    }

    pub(crate) fn len(&self) -> usize {
        self.shared.map.len()
    }

    pub(crate) fn page_bytes(&self) -> usize {
        self.shared.page_bytes
    }

    /// Write faults served so far.
    pub(crate) fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    /// Why tracking broke, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        lock(&self.shared.failed).clone()
    }

    /// Locks the dirty set. Hold it while diffing or restoring: a concurrent first write to a
    /// page waits in its fault until the lock is released.
    pub(crate) fn dirty(&self) -> MutexGuard<'_, Dirty> {
        lock(&self.shared.dirty)
    }

    /// Write-protects the given pages again (runs of adjacent pages in one ioctl).
    pub(crate) fn protect_pages(&self, pages: &[u32]) -> Result<(), UffdError> {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        let pb = self.shared.page_bytes;
        let base = self.shared.map.base() as usize;
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            self.shared.uffd.protect(base + sorted[i] as usize * pb, (j - i) * pb)?;
            i = j;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn handler_loop(s: &Shared, stop_fd: i32) {
    let mut msgs = [UffdMsg::default(); 32];
    let mut fds = [
        libc::pollfd { fd: s.uffd.raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return fail(s, "poll on the userfaultfd failed");
        }
        if fds[1].revents != 0 {
            return;
        }
        let n = match s.uffd.read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(e) => return fail(s, &e.to_string()),
        };
        for m in &msgs[..n] {
            if m.event != UFFD_EVENT_PAGEFAULT || m.flags & UFFD_PAGEFAULT_FLAG_WP == 0 {
                continue;
            }
            if let Err(e) = serve_wp_fault(s, m.address) {
                return fail(s, &e.to_string());
            }
        }
    }
}

fn serve_wp_fault(s: &Shared, address: u64) -> Result<(), UffdError> {
    let pb = s.page_bytes;
    let base = s.map.base() as usize;
    let offset = usize::try_from(address).unwrap_or(usize::MAX).wrapping_sub(base) / pb * pb;
    if offset >= s.map.len() {
        return Ok(());
    }
    {
        let mut d = lock(&s.dirty);
        // SAFETY: the page is inside our mapping and still write-protected (its writer is
        // blocked in this fault, any other writer would fault too), so nobody mutates it while
        // we copy it.
        let page = unsafe { std::slice::from_raw_parts(s.map.base().add(offset), pb) };
        d.record(u32::try_from(offset / pb).expect("fewer than 2^32 pages"), page);
        s.faults.fetch_add(1, Ordering::Relaxed);
        // Unprotect while still holding the lock, so that "in the dirty set" always implies
        // "writable" for whoever takes the lock next (abort writes twins back without faulting).
        // Unprotecting also wakes every thread waiting on this page.
        s.uffd.unprotect(base + offset, pb)
    }
}

/// Tracking is broken: record why and unregister, which wakes blocked writers and lets every
/// later write through untracked; the region refuses further commits.
fn fail(s: &Shared, why: &str) {
    *lock(&s.failed) = Some(why.to_owned());
    let _ = s.uffd.unregister(s.map.base() as usize, s.map.len());
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        let _ = self.shared.uffd.unregister(self.shared.map.base() as usize, self.shared.map.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_to_a_page_saves_its_twin_once() {
        let t = Tracker::new::<TrackError>(16 * 4096, |m| {
            m.fill(7);
            Ok(())
        })
        .expect("tracker");
        let pb = t.page_bytes();
        // SAFETY: test-only writes inside the mapping from this thread; the handler serves them.
        unsafe {
            *t.base().add(3 * pb + 5) = 1;
            *t.base().add(3 * pb + 6) = 2;
            *t.base().add(9 * pb) = 3;
        }
        let mut d = t.dirty();
        assert_eq!(d.pages(), &[3, 9]);
        assert!(d.twin(3).expect("twin").iter().all(|&b| b == 7));
        assert!(d.twin(1).is_none());
        let pages = d.pages().to_vec();
        t.protect_pages(&pages).expect("reprotect");
        d.clear();
        drop(d);
        // SAFETY: as above.
        unsafe { *t.base().add(3 * pb) = 4 };
        assert_eq!(t.dirty().pages(), &[3]);
        assert_eq!(t.faults(), 3);
    }
}
