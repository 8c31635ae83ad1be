//! Ordinary memory for allocations made while a thread bypasses routing (the fault handler; a
//! program thread inside a call into the runtime) when the program brings its own allocator
//! (jemalloc, tcmalloc...).
//!
//! The runtime's own allocations go to glibc's heap (see `LibcAllocator`), but std makes some
//! through `System`, that is through `malloc`: since Rust 1.93 a thread's handle, with the
//! state `park`/`unpark` use, is an `Arc<_, System>`. Under glibc's allocator a bypassing
//! thread's `malloc` is glibc's, whose memory is never routed. Under another allocator every
//! `malloc` is forwarded, and its blocks come from chunks it mapped earlier, which the hooks
//! routed into cluster memory. The fault handler unparks a thread that waits for a reply, so
//! it touched such a block: redis (jemalloc) under `run` hung with the handler itself in
//! `handle_userfault` on the parking state of a jemalloc thread waiting for a discard, a page
//! the handler had evicted (it waited for itself, and the program with it).
//!
//! So while a thread bypasses routing under such an allocator, its blocks come from here:
//! one reservation of address space outside the arena, never registered with userfaultfd,
//! carved into power-of-two slots with a free list per size. `free` knows these blocks by
//! their address.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

/// Address space reserved (memory is committed only as slots are first used).
const RESERVE: usize = 16 << 30;
/// Bytes before each block: its class and where its slot begins.
const HEADER: usize = 16;
/// Smallest slot (header included): 32 bytes.
const MIN_SLOT_SHIFT: u32 = 5;
/// Slot sizes: 32 bytes up to half the reservation.
const CLASSES: usize = (RESERVE.trailing_zeros() - MIN_SLOT_SHIFT) as usize;
/// Slots are aligned to their size up to this.
const SLOT_ALIGN_MAX: usize = 4096;

/// The local heap: `base..base + RESERVE`, handed out from `bump` upwards.
#[derive(Debug)]
pub(crate) struct LocalHeap {
    base: usize,
    bump: AtomicUsize,
    /// Per class, the first free slot (0: none); a free slot holds the next one's address.
    free: Vec<Mutex<usize>>,
}

static HEAP: OnceLock<Option<LocalHeap>> = OnceLock::new();

/// The heap, reserved on first use; None if the address space could not be reserved.
pub(crate) fn heap() -> Option<&'static LocalHeap> {
    HEAP.get_or_init(|| {
        // SAFETY: a fresh private anonymous reservation at a kernel-chosen address. The raw
        // system call, not `libc::mmap`: that symbol is this library's hook.
        let base = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                0usize,
                RESERVE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0usize,
            )
        };
        // A failed mmap returns -errno, which is no address.
        let base = usize::try_from(base).ok().filter(|&b| b as *mut libc::c_void != libc::MAP_FAILED)?;
        let free = (0..CLASSES).map(|_| Mutex::new(0)).collect();
        Some(LocalHeap { base, bump: AtomicUsize::new(base), free })
    })
    .as_ref()
}

/// The heap, if `p` is one of its blocks.
pub(crate) fn holding(p: *mut libc::c_void) -> Option<&'static LocalHeap> {
    let h = HEAP.get()?.as_ref()?;
    (h.base..h.base + RESERVE).contains(&(p as usize)).then_some(h)
}

/// The class whose slots fit `need` bytes.
fn class_of(need: usize) -> Option<usize> {
    let shift = need.max(1 << MIN_SLOT_SHIFT).checked_next_power_of_two()?.trailing_zeros();
    let c = (shift - MIN_SLOT_SHIFT) as usize;
    (c < CLASSES).then_some(c)
}

const fn slot_size(c: usize) -> usize {
    1 << (c as u32 + MIN_SLOT_SHIFT)
}

impl LocalHeap {
    /// A block of `size` bytes aligned to `align` (a power of two); null when out of room.
    pub(crate) fn alloc(&self, size: usize, align: usize) -> *mut libc::c_void {
        let align = align.max(HEADER);
        // Room for the header and for moving the block up to its alignment (a slot aligned
        // to less than `align` may need twice it).
        let pad = if align <= SLOT_ALIGN_MAX { align } else { 2 * align };
        let Some(c) = size.checked_add(pad).and_then(class_of) else {
            return std::ptr::null_mut();
        };
        let Some(slot) = self.take_slot(c) else { return std::ptr::null_mut() };
        let block = (slot + HEADER).next_multiple_of(align);
        // SAFETY: `block - HEADER .. block + size` lies inside the slot, which is ours until
        // freed; the header is 16-aligned like every block.
        unsafe {
            let header = (block - HEADER) as *mut usize;
            header.write(c);
            header.add(1).write(slot);
        }
        block as *mut libc::c_void
    }

    fn take_slot(&self, c: usize) -> Option<usize> {
        let mut head = self.free[c].lock().unwrap_or_else(|e| e.into_inner());
        if *head != 0 {
            let slot = *head;
            // SAFETY: a free slot of this class holds the next free slot's address.
            *head = unsafe { *(slot as *const usize) };
            return Some(slot);
        }
        drop(head);
        let size = slot_size(c);
        let align = size.min(SLOT_ALIGN_MAX);
        let mut cur = self.bump.load(Relaxed);
        loop {
            let slot = cur.next_multiple_of(align);
            let end = slot.checked_add(size).filter(|&e| e <= self.base + RESERVE)?;
            match self.bump.compare_exchange_weak(cur, end, Relaxed, Relaxed) {
                Ok(_) => return Some(slot),
                Err(now) => cur = now,
            }
        }
    }

    /// The class and slot of the block at `p`, from its header.
    fn header(p: *mut libc::c_void) -> (usize, usize) {
        // SAFETY: `p` is a block of this heap: its header precedes it.
        unsafe {
            let header = (p as usize - HEADER) as *const usize;
            (header.read(), header.add(1).read())
        }
    }

    /// Bytes usable at `p`.
    pub(crate) fn usable_size(&self, p: *mut libc::c_void) -> usize {
        let (c, slot) = Self::header(p);
        slot + slot_size(c) - p as usize
    }

    /// Returns the block at `p` to its class.
    pub(crate) fn free(&self, p: *mut libc::c_void) {
        let (c, slot) = Self::header(p);
        let mut head = self.free[c].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the slot is ours again and at least 32 bytes: its first word links it.
        unsafe { *(slot as *mut usize) = *head };
        *head = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_sized_reused_and_known_by_address() {
        let h = heap().expect("address space for the local heap");
        for (size, align) in
            [(1, 16), (24, 16), (100, 64), (4096, 4096), (5000, 16), (3 << 20, 16), (10, 1 << 16)]
        {
            let p = h.alloc(size, align);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "{size} bytes aligned to {align}");
            assert!(h.usable_size(p) >= size, "{size} bytes fit");
            assert!(holding(p).is_some());
            // SAFETY: the block is ours and `size` bytes long.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xA5, size) };
            h.free(p);
            assert_eq!(h.alloc(size, align), p, "a freed block of the same size is reused");
            h.free(p);
        }
        let mut local = 0u8;
        assert!(holding(std::ptr::addr_of_mut!(local).cast()).is_none(), "other memory is not the heap's");
    }
}
