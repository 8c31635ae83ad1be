//! The memory a host donates: slabs of anonymous memory with capacity accounting.
//!
//! A slab is one `MAP_NORESERVE` anonymous mapping, so a granted but never-written page costs
//! nothing until it is written. Capacity is accounted by what is granted, not what is touched,
//! so a host never promises more than it donated. Writes take a per-page stripe lock, so a
//! reader sees a page before or after a `WriteLines` frame, never half of it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use clustermem_mmap::AnonMapping;
use clustermem_proto::{ErrorCode, HostStats, LINE_SIZE, MAX_PAYLOAD, PAGE_SIZE};

/// Largest slab one request may ask for (1 TiB): a sanity bound against garbage sizes.
const MAX_SLAB_BYTES: u64 = 1 << 40;
/// Lock stripes per slab; page `p` uses stripe `p % LOCK_STRIPES`.
const LOCK_STRIPES: usize = 1024;
/// Largest `ReadBytes` range: the `Pages` reply carries the 8-byte offset before the data and
/// must fit one frame.
pub(crate) const MAX_READ_BYTES: u64 = (MAX_PAYLOAD - 8) as u64;

/// A refused request: the code for the wire and a sentence for the person reading it.
pub(crate) type Refusal = (ErrorCode, String);

/// One granted slab of memory. Every access to its bytes goes through the methods below under
/// the page's stripe lock, so concurrent use from several connection threads is race free.
#[derive(Debug)]
pub(crate) struct Slab {
    map: AnonMapping,
    locks: Box<[RwLock<()>]>,
    /// The client region it belongs to: (its owner's session, the client's region tag).
    region: (u64, u64),
}

impl Slab {
    fn new(len: usize, region: (u64, u64)) -> Result<Self, Refusal> {
        let map = AnonMapping::new(len)
            .map_err(|e| (ErrorCode::OutOfCapacity, format!("host could not map {len} bytes: {e}")))?;
        let locks = (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect();
        Ok(Self { map, locks, region })
    }

    fn pages(&self) -> u64 {
        (self.map.len() / PAGE_SIZE) as u64
    }

    fn check_range(&self, first_page: u64, count: u64) -> Result<usize, Refusal> {
        match first_page.checked_add(count) {
            Some(end) if count > 0 && end <= self.pages() => Ok(usize::try_from(first_page).expect("< len")),
            _ => Err((
                ErrorCode::OutOfRange,
                format!("pages {first_page}+{count} outside a slab of {} pages", self.pages()),
            )),
        }
    }

    fn page_ptr(&self, page: usize) -> *mut u8 {
        // SAFETY: callers checked `page < pages()`, so the offset stays inside the mapping.
        unsafe { self.map.as_ptr().add(page * PAGE_SIZE) }
    }

    fn stripe(&self, page: usize) -> &RwLock<()> {
        &self.locks[page % LOCK_STRIPES]
    }

    /// Appends `count` pages from `first_page` to `out`.
    pub(crate) fn read_pages(&self, first_page: u64, count: u64, out: &mut Vec<u8>) -> Result<(), Refusal> {
        let first = self.check_range(first_page, count)?;
        for page in first..first + count as usize {
            let _guard = self.stripe(page).read().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the page lies inside the mapping (checked) and its writers are excluded
            // by the stripe lock held here.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(self.page_ptr(page), PAGE_SIZE) });
        }
        Ok(())
    }

    /// Appends `len` bytes from byte `offset` to `out`, any alignment. Each page the range
    /// touches is copied under its stripe lock, so a page's part is seen before or after a
    /// concurrent write of that page, never half of it: the guarantee `read_pages` gives.
    pub(crate) fn read_bytes(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), Refusal> {
        if len == 0 {
            return Err((ErrorCode::BadRequest, "ReadBytes of 0 bytes".to_string()));
        }
        let slab_len = self.map.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= slab_len && len <= MAX_READ_BYTES => {}
            _ => {
                return Err((
                    ErrorCode::OutOfRange,
                    format!(
                        "bytes {offset}+{len} outside a slab of {slab_len} bytes or over the \
                         {MAX_READ_BYTES}-byte limit"
                    ),
                ))
            }
        }
        let mut pos = usize::try_from(offset).expect("< slab length");
        let end = pos + usize::try_from(len).expect("< slab length");
        out.reserve(end - pos);
        while pos < end {
            let page = pos / PAGE_SIZE;
            let chunk = (PAGE_SIZE - pos % PAGE_SIZE).min(end - pos);
            let _guard = self.stripe(page).read().unwrap_or_else(|e| e.into_inner());
            // SAFETY: `pos + chunk <= end <= len()` (checked) and the chunk stays inside page
            // `page`, whose writers are excluded by the stripe lock held here.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(pos), chunk) });
            pos += chunk;
        }
        Ok(())
    }

    /// Overwrites whole pages from `first_page` with `data`.
    pub(crate) fn write_pages(&self, first_page: u64, data: &[u8]) -> Result<(), Refusal> {
        let first = self.check_range(first_page, (data.len() / PAGE_SIZE) as u64)?;
        for (i, src) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let page = first + i;
            let _guard = self.stripe(page).write().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the page lies inside the mapping (checked); the stripe lock excludes
            // every other reader and writer of it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.page_ptr(page), PAGE_SIZE) };
        }
        Ok(())
    }

    /// Zeroes `count` pages from `first_page` and returns their memory to the system: the
    /// client freed them, so they need not cost this host anything until written again.
    pub(crate) fn discard_pages(&self, first_page: u64, count: u64) -> Result<(), Refusal> {
        let first = self.check_range(first_page, count)?;
        let count = usize::try_from(count).expect("checked against the slab length");
        // Every stripe the range touches, in index order (the only order any path takes two).
        let mut stripes: Vec<usize> =
            (first..first + count.min(LOCK_STRIPES)).map(|p| p % LOCK_STRIPES).collect();
        stripes.sort_unstable();
        let _guards: Vec<_> =
            stripes.iter().map(|&s| self.locks[s].write().unwrap_or_else(|e| e.into_inner())).collect();
        // SAFETY: the range lies inside this slab's private anonymous mapping (checked) and the
        // stripe locks exclude every reader and writer of its pages; after MADV_DONTNEED they
        // read as zeros, which is what a discarded page means.
        let rc =
            unsafe { libc::madvise(self.page_ptr(first).cast(), count * PAGE_SIZE, libc::MADV_DONTNEED) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err((ErrorCode::HostFault, format!("host could not discard pages: {e}")));
        }
        Ok(())
    }

    /// Overwrites the lines of `page` named by `line_mask` with `lines`, in ascending order.
    pub(crate) fn write_lines(&self, page: u64, line_mask: u64, lines: &[u8]) -> Result<(), Refusal> {
        self.update_lines(page, line_mask, lines, |dst, src| dst.copy_from_slice(src))
    }

    /// XORs `lines` into the lines of `page` named by `line_mask`, in ascending order.
    pub(crate) fn xor_lines(&self, page: u64, line_mask: u64, lines: &[u8]) -> Result<(), Refusal> {
        self.update_lines(page, line_mask, lines, |dst, src| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d ^= s;
            }
        })
    }

    /// Applies `apply(line, data)` to each line of `page` named by `line_mask`.
    fn update_lines(
        &self,
        page: u64,
        line_mask: u64,
        lines: &[u8],
        apply: impl Fn(&mut [u8], &[u8]),
    ) -> Result<(), Refusal> {
        let page = self.check_range(page, 1)?;
        debug_assert_eq!(lines.len(), line_mask.count_ones() as usize * LINE_SIZE, "checked by the decoder");
        let _guard = self.stripe(page).write().unwrap_or_else(|e| e.into_inner());
        let mut mask = line_mask;
        for src in lines.chunks_exact(LINE_SIZE) {
            let line = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            // SAFETY: `line < 64`, so the 64 bytes lie inside the checked page of this slab's
            // mapping; the stripe lock excludes every other reader and writer of it, so no
            // other reference to these bytes exists while this one does.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.page_ptr(page).add(line * LINE_SIZE), LINE_SIZE)
            };
            apply(dst, src);
        }
        Ok(())
    }
}

/// All slabs of one host and the accounting of its capacity.
#[derive(Debug)]
pub(crate) struct Store {
    capacity_bytes: u64,
    used_bytes: AtomicU64,
    next_id: AtomicU64,
    slabs: Mutex<HashMap<u64, Arc<Slab>>>,
    pub(crate) clients: AtomicU64,
    /// Slabs kept for a session whose connection ended (see `sessions`).
    pub(crate) orphaned: AtomicU64,
}

impl Store {
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            used_bytes: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            slabs: Mutex::new(HashMap::new()),
            clients: AtomicU64::new(0),
            orphaned: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Grants a slab of `bytes` for `region` (owner, tag), or refuses if that would exceed
    /// the capacity.
    pub(crate) fn alloc(&self, bytes: u64, region: (u64, u64)) -> Result<(u64, Arc<Slab>), Refusal> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE as u64) || bytes > MAX_SLAB_BYTES {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "slab size {bytes} must be a non-zero multiple of {PAGE_SIZE} up to {MAX_SLAB_BYTES}"
                ),
            ));
        }
        let reserved = self.used_bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|&total| total <= self.capacity_bytes)
        });
        if let Err(used) = reserved {
            return Err((
                ErrorCode::OutOfCapacity,
                format!(
                    "host is full: {} of {} bytes free, {bytes} asked",
                    self.capacity_bytes - used,
                    self.capacity_bytes
                ),
            ));
        }
        let slab = match Slab::new(usize::try_from(bytes).expect("bounded by MAX_SLAB_BYTES"), region) {
            Ok(slab) => Arc::new(slab),
            Err(refusal) => {
                self.used_bytes.fetch_sub(bytes, Ordering::AcqRel);
                return Err(refusal);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.slabs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::clone(&slab));
        Ok((id, slab))
    }

    /// Frees a slab; its memory goes back once no request still holds it.
    pub(crate) fn free(&self, id: u64) -> bool {
        let removed = self.slabs.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        if let Some(slab) = removed {
            self.used_bytes.fetch_sub(slab.map.len() as u64, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Slab>> {
        self.slabs.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    pub(crate) fn stats(&self) -> HostStats {
        let slabs = self.slabs.lock().unwrap_or_else(|e| e.into_inner());
        let regions: HashSet<(u64, u64)> = slabs.values().map(|s| s.region).collect();
        HostStats {
            capacity_bytes: self.capacity_bytes,
            used_bytes: self.used_bytes.load(Ordering::Acquire),
            slabs: slabs.len() as u64,
            clients: self.clients.load(Ordering::Relaxed),
            orphaned_slabs: self.orphaned.load(Ordering::Relaxed),
            regions: regions.len() as u64,
        }
    }

    /// A fresh owner for a connection's slabs until it binds to a session. Session tokens are
    /// random, so meeting one of these is a 2^-63 chance per pair, and would only merge two
    /// regions in the count.
    pub(crate) fn connection_owner(&self) -> u64 {
        (1 << 63) | self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_enforced_and_returned_on_free() {
        let store = Store::new(8 * PAGE_SIZE as u64);
        let (a, _) = store.alloc(6 * PAGE_SIZE as u64, (1, 1)).unwrap();
        let err = store.alloc(4 * PAGE_SIZE as u64, (1, 1)).unwrap_err();
        assert_eq!(err.0, ErrorCode::OutOfCapacity);
        assert!(err.1.contains("8192 of 32768 bytes free"), "{}", err.1);
        assert!(store.free(a));
        assert!(!store.free(a));
        store.alloc(8 * PAGE_SIZE as u64, (1, 1)).unwrap();
        assert_eq!(store.stats().used_bytes, 8 * PAGE_SIZE as u64);
    }

    /// Regions are counted by (owner, tag): two tags of one owner are two regions, the same
    /// tag of two owners too, and several slabs of one region are one.
    #[test]
    fn stats_count_distinct_regions() {
        let store = Store::new(1 << 30);
        let page = PAGE_SIZE as u64;
        for region in [(1, 1), (1, 1), (1, 2), (2, 1)] {
            store.alloc(page, region).unwrap();
        }
        let stats = store.stats();
        assert_eq!((stats.slabs, stats.regions), (4, 3));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let store = Store::new(1 << 30);
        for bytes in [0, 100, MAX_SLAB_BYTES + PAGE_SIZE as u64] {
            assert_eq!(store.alloc(bytes, (1, 1)).unwrap_err().0, ErrorCode::BadRequest, "{bytes}");
        }
    }

    #[test]
    fn discarded_pages_read_as_zeros() {
        let store = Store::new(1 << 20);
        let (_, slab) = store.alloc(16 * PAGE_SIZE as u64, (1, 1)).expect("fits");
        slab.write_pages(2, &vec![7u8; 3 * PAGE_SIZE]).expect("in range");
        slab.discard_pages(3, 1).expect("in range");
        let mut out = Vec::new();
        slab.read_pages(2, 3, &mut out).expect("in range");
        assert!(out[..PAGE_SIZE].iter().all(|&b| b == 7));
        assert!(out[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(out[2 * PAGE_SIZE..].iter().all(|&b| b == 7));
        assert!(slab.discard_pages(15, 2).is_err(), "past the end is refused");
    }

    #[test]
    fn byte_ranges_read_back_at_any_alignment() {
        let store = Store::new(1 << 20);
        let (_, slab) = store.alloc(4 * PAGE_SIZE as u64, (1, 1)).unwrap();
        let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        slab.write_pages(0, &data).unwrap();
        for (offset, len) in
            [(0, 1), (5 * 512, 512), (1000, 2048), (4095, 2), (100, 3 * PAGE_SIZE), (0, 4 * PAGE_SIZE)]
        {
            let mut out = vec![0xAA];
            slab.read_bytes(offset as u64, len as u64, &mut out).unwrap();
            assert_eq!(&out[1..], &data[offset..offset + len], "{offset}+{len}");
        }
        let mut out = Vec::new();
        assert_eq!(slab.read_bytes(0, 0, &mut out).unwrap_err().0, ErrorCode::BadRequest);
        assert_eq!(
            slab.read_bytes(4 * PAGE_SIZE as u64 - 1, 2, &mut out).unwrap_err().0,
            ErrorCode::OutOfRange
        );
        assert_eq!(slab.read_bytes(u64::MAX, 2, &mut out).unwrap_err().0, ErrorCode::OutOfRange);
        assert!(out.is_empty(), "a refused read appends nothing");
        // Inside a large enough slab, a range whose reply would not fit one frame is refused.
        let store = Store::new(32 << 20);
        let (_, big) = store.alloc(32 << 20, (1, 1)).unwrap();
        assert_eq!(big.read_bytes(0, MAX_READ_BYTES + 1, &mut out).unwrap_err().0, ErrorCode::OutOfRange);
    }

    /// A byte range spanning pages sees each page whole while `WriteLines` rewrite it.
    #[test]
    fn byte_reads_never_see_half_a_line_write() {
        let store = Store::new(1 << 20);
        let (_, slab) = store.alloc(2 * PAGE_SIZE as u64, (1, 1)).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for round in 0u8..=255 {
                    let lines = vec![round; 64 * LINE_SIZE];
                    slab.write_lines(1, u64::MAX, &lines).unwrap();
                }
                stop.store(true, Ordering::Release);
            });
            let mut out = Vec::new();
            while !stop.load(Ordering::Acquire) {
                out.clear();
                slab.read_bytes(PAGE_SIZE as u64 - 100, PAGE_SIZE as u64, &mut out).unwrap();
                let page1 = &out[100..];
                assert!(page1.iter().all(|&b| b == page1[0]), "torn read of page 1");
            }
        });
    }

    #[test]
    fn pages_and_lines_read_back() {
        let store = Store::new(1 << 20);
        let (_, slab) = store.alloc(4 * PAGE_SIZE as u64, (1, 1)).unwrap();
        let mut out = Vec::new();
        slab.read_pages(0, 4, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0), "fresh slabs read as zeros");
        slab.write_pages(1, &[7u8; 2 * PAGE_SIZE]).unwrap();
        let lines: Vec<u8> = (0..2 * LINE_SIZE).map(|i| (i / LINE_SIZE) as u8 + 1).collect();
        slab.write_lines(2, (1 << 0) | (1 << 63), &lines).unwrap();
        out.clear();
        slab.read_pages(2, 1, &mut out).unwrap();
        assert!(out[..LINE_SIZE].iter().all(|&b| b == 1));
        assert!(out[LINE_SIZE..PAGE_SIZE - LINE_SIZE].iter().all(|&b| b == 7));
        assert!(out[PAGE_SIZE - LINE_SIZE..].iter().all(|&b| b == 2));
        assert_eq!(slab.read_pages(3, 2, &mut out).unwrap_err().0, ErrorCode::OutOfRange);
        assert_eq!(slab.read_pages(u64::MAX, 2, &mut out).unwrap_err().0, ErrorCode::OutOfRange);
    }
}
