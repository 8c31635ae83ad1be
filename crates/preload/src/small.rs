//! Small malloc blocks (up to 256 KiB) in the arena, so that under glibc's allocator the
//! program's heap lives in cluster memory too, not only its large blocks. Size classes (16-byte
//! steps to 128 bytes, then four per power of two) are carved from 1 MiB runs taken from the
//! arena; a run serves one class, so a block's class follows from its address. Freed blocks go
//! on an intrusive per-class free list. Runs are never given back (their unused pages cost
//! no local memory once evicted).

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

use crate::state::State;

/// Largest small block.
pub(crate) const SMALL_MAX: usize = 256 << 10;
/// Bytes of arena a run takes (aligned to its size).
pub(crate) const RUN: usize = 1 << 20;
const CLASSES: usize = class_of(SMALL_MAX) + 1;
const _: () = assert!(RUN / SMALL_MAX >= 4, "a run holds several of the largest blocks");

/// The class serving `size` bytes (1..=SMALL_MAX).
pub(crate) const fn class_of(size: usize) -> usize {
    let size = if size == 0 { 1 } else { size };
    if size <= 128 {
        return size.div_ceil(16) - 1;
    }
    let p = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
    let step = 1 << (p - 2);
    let k = (size - (1 << p)).div_ceil(step);
    8 + (p - 7) * 4 + (k - 1)
}

/// The block size of class `c`.
pub(crate) const fn class_size(c: usize) -> usize {
    if c < 8 {
        return (c + 1) * 16;
    }
    let p = 7 + (c - 8) / 4;
    let k = (c - 8) % 4 + 1;
    (1 << p) + k * (1 << (p - 2))
}

#[derive(Debug, Default)]
struct Class {
    /// First free block (0: none); each free block holds the address of the next.
    head: usize,
    /// Never-used blocks of the current run: `bump..end`.
    bump: usize,
    end: usize,
}

/// The small-block heap of one arena.
#[derive(Debug)]
pub(crate) struct SmallHeap {
    classes: Vec<Mutex<Class>>,
    /// Per run of the arena: 0 if it is not a small-block run, else its class + 1.
    run_class: Box<[AtomicU8]>,
}

impl SmallHeap {
    pub(crate) fn new(arena_len: usize) -> Self {
        Self {
            classes: (0..CLASSES).map(|_| Mutex::new(Class::default())).collect(),
            run_class: (0..arena_len / RUN).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// A block of at least `size` bytes (<= SMALL_MAX), aligned to 16; `None` when the arena
    /// cannot give a new run.
    pub(crate) fn alloc(&self, st: &State, size: usize) -> Option<usize> {
        let c = class_of(size);
        let block = class_size(c);
        let mut class = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        if class.head != 0 {
            let p = class.head;
            // SAFETY: `p` is a free block of this class: handed out by this heap, freed, and
            // holding the next free block's address in its first word (written by `free`).
            class.head = unsafe { *(p as *const usize) };
            return Some(p);
        }
        if class.bump + block > class.end {
            let run = st.allocate(RUN, RUN).ok()?;
            self.run_class[(run - st.base) / RUN].store(u8::try_from(c + 1).expect("few classes"), Relaxed);
            class.bump = run;
            class.end = run + RUN / block * block;
        }
        let p = class.bump;
        class.bump += block;
        Some(p)
    }

    /// The block size at `addr` if it lies in a small-block run.
    pub(crate) fn block_size(&self, st: &State, addr: usize) -> Option<usize> {
        let c = self.run_class.get((addr - st.base) / RUN)?.load(Relaxed);
        (c != 0).then(|| class_size(usize::from(c) - 1))
    }

    /// Returns the block at `addr` (in a small-block run) to its class.
    pub(crate) fn free(&self, st: &State, addr: usize) {
        let c = usize::from(self.run_class[(addr - st.base) / RUN].load(Relaxed)) - 1;
        let mut class = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the block is at least 16 bytes and 16-aligned, and the program gave it up:
        // its first word is ours to hold the free list's link.
        unsafe { *(addr as *mut usize) = class.head };
        class.head = addr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_gets_the_smallest_class_that_fits() {
        let mut prev = 0;
        for c in 0..CLASSES {
            let size = class_size(c);
            assert!(size > prev && size.is_multiple_of(16), "class {c}: {size}");
            assert_eq!(class_of(size), c, "a class's own size maps to it");
            assert_eq!(class_of(prev + 1), c, "the first size above the previous class");
            assert!(size - prev <= size / 4 + 16, "waste within a quarter: class {c}");
            prev = size;
        }
        assert_eq!(class_size(CLASSES - 1), SMALL_MAX);
        assert_eq!(class_of(0), 0);
    }
}
