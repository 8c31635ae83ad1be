//! The program's malloc, routed. glibc's malloc maps its large chunks with an internal mmap
//! and grows its heap with brk, neither of which a preload can see, so under glibc's
//! allocator this library is the program's malloc: blocks of at least `min_bytes` get pages
//! of their own in the arena, smaller ones come from size classes in the arena (`small.rs`),
//! and glibc keeps only what cannot be routed (over-aligned small blocks, memory of a forked
//! child, blocks made before the arena existed). A program with an
//! allocator of its own (jemalloc, tcmalloc...) keeps it: every call is forwarded, and the
//! allocator's own `mmap` calls are routed by `hooks.rs` instead.
//!
//! The next allocator is looked up with `dlsym(RTLD_NEXT)` on first use. Should that lookup
//! itself allocate, the allocation comes from a small static buffer whose blocks are never
//! freed.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use libc::{c_int, c_void};

use crate::local_heap::{self, LocalHeap};
use crate::small::SMALL_MAX;
use crate::state::{active, page_round, PlaceError, State};
use clustermem_runtime::PAGE_SIZE;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
}

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;

/// The allocator this library stands in front of.
struct Next {
    malloc: MallocFn,
    free: FreeFn,
    calloc: CallocFn,
    realloc: ReallocFn,
    memalign: MemalignFn,
    usable_size: UsableFn,
    /// The next allocator is glibc's: large blocks are ours to place.
    glibc: bool,
}

static NEXT: OnceLock<Next> = OnceLock::new();

thread_local! {
    static RESOLVING: Cell<bool> = const { Cell::new(false) };
}

fn lookup(name: &std::ffi::CStr) -> usize {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; returns null if absent.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

/// The next allocator, or `None` while it is being looked up on this thread.
fn next() -> Option<&'static Next> {
    if let Some(n) = NEXT.get() {
        return Some(n);
    }
    if RESOLVING.with(|r| r.replace(true)) {
        return None;
    }
    let names = [c"malloc", c"free", c"calloc", c"realloc", c"memalign", c"malloc_usable_size"];
    let addrs = names.map(lookup);
    RESOLVING.with(|r| r.set(false));
    if let Some(i) = addrs.iter().position(|&a| a == 0) {
        let msg =
            format!("clustermem: no `{}` after this library in the process\n", names[i].to_string_lossy());
        // SAFETY: writes a buffer we own to stderr, then ends the process: without an
        // allocator to forward to there is no way on.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
    // SAFETY: each address is the named C function of the next object, which has the C
    // signature of the matching type (malloc(3) and friends).
    let next = unsafe {
        Next {
            malloc: std::mem::transmute::<usize, MallocFn>(addrs[0]),
            free: std::mem::transmute::<usize, FreeFn>(addrs[1]),
            calloc: std::mem::transmute::<usize, CallocFn>(addrs[2]),
            realloc: std::mem::transmute::<usize, ReallocFn>(addrs[3]),
            memalign: std::mem::transmute::<usize, MemalignFn>(addrs[4]),
            usable_size: std::mem::transmute::<usize, UsableFn>(addrs[5]),
            glibc: addrs[0] == __libc_malloc as *const () as usize,
        }
    };
    Some(NEXT.get_or_init(|| next))
}

/// Allocations made while the next allocator is being looked up.
struct BootBuffer(std::cell::UnsafeCell<[u8; 1 << 16]>);
// SAFETY: blocks are handed out by an atomic bump pointer, so no two callers share bytes.
unsafe impl Sync for BootBuffer {}
static BOOT: BootBuffer = BootBuffer(std::cell::UnsafeCell::new([0; 1 << 16]));
static BOOT_USED: AtomicUsize = AtomicUsize::new(0);

fn boot_alloc(size: usize) -> *mut c_void {
    let size = size.max(1).next_multiple_of(16);
    let start = BOOT_USED.fetch_add(size, Relaxed);
    if start + size > 1 << 16 {
        return std::ptr::null_mut();
    }
    // SAFETY: `start + size` lies inside the buffer and this range is ours alone.
    unsafe { BOOT.0.get().cast::<u8>().add(start).cast() }
}

fn is_boot(p: *mut c_void) -> bool {
    let base = BOOT.0.get() as usize;
    (base..base + (1 << 16)).contains(&(p as usize))
}

/// The local heap, for a thread whose memory stays ordinary under an allocator of the
/// program's own, whose blocks may lie in cluster memory (see `local_heap`).
fn local() -> Option<&'static LocalHeap> {
    next().filter(|n| !n.glibc)?;
    if !crate::state::bypassing() {
        return None;
    }
    local_heap::heap()
}

/// The arena state when large blocks are ours to place (glibc's allocator, routing active).
fn placing() -> Option<&'static State> {
    next().filter(|n| n.glibc).and(active())
}

/// Places a block in the arena: `Some(null)` when the hosts refuse it (malloc fails as it
/// would when out of memory), `None` when it should go to the next allocator.
fn place(st: &State, size: usize, align: usize) -> Option<*mut c_void> {
    if size < st.min_bytes {
        if align > 16 || size > SMALL_MAX {
            return None;
        }
        return st.small.alloc(st, size).map(|p| p as *mut c_void);
    }
    let len = page_round(size)?;
    match st.allocate(len, align.max(PAGE_SIZE)) {
        Ok(addr) => {
            st.add_block(addr, len);
            Some(addr as *mut c_void)
        }
        Err(PlaceError::ArenaFull) => None,
        Err(PlaceError::Refused(e)) => {
            crate::state::say_refused(format_args!("an allocation of {size} bytes was refused: {e}"));
            // SAFETY: this thread's errno slot.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            Some(std::ptr::null_mut())
        }
    }
}

/// A malloc block in the arena.
#[derive(Debug, Clone, Copy)]
enum Block {
    /// Pages of its own, this long.
    Large(usize),
    /// A size-class block of this size.
    Small(usize),
}

impl Block {
    fn size(self) -> usize {
        match self {
            Self::Large(n) | Self::Small(n) => n,
        }
    }
}

/// The arena block at `p`, if `p` lies in the arena. A pointer into the arena that starts no
/// block is a bug in the program (as glibc would say, an invalid pointer): abort.
fn block_of(p: *mut c_void) -> Option<(&'static State, Block)> {
    // Only under glibc's allocator are arena blocks malloc's; another allocator's blocks may
    // lie in the arena (its mmap calls are routed) and are its own to free.
    next().filter(|n| n.glibc)?;
    let st = crate::state::STATE.get()?;
    if !st.contains(p as usize, 1) {
        return None;
    }
    if let Some(size) = st.small.block_size(st, p as usize) {
        return Some((st, Block::Small(size)));
    }
    match st.block_len(p as usize) {
        Some(len) => Some((st, Block::Large(len))),
        None => {
            eprintln!("clustermem: free(): invalid pointer {p:p} into cluster memory");
            std::process::abort();
        }
    }
}

/// Frees an arena block (in a forked child, which has no runtime, the block is left alone).
fn free_block(st: &State, p: *mut c_void, block: Block) {
    if crate::state::FORKED.load(Relaxed) {
        return;
    }
    let len = match block {
        Block::Small(_) => return st.small.free(st, p as usize),
        Block::Large(len) => len,
    };
    st.set_block(p as usize, None);
    if let Err(e) = st.free(p as usize, len) {
        eprintln!("clustermem: freeing {len} bytes of cluster memory failed: {e}");
    }
}

/// `malloc(3)`.
#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    if let Some(h) = local() {
        return h.alloc(size, 16);
    }
    if let Some(p) = placing().and_then(|st| place(st, size, 16)) {
        return p;
    }
    match next() {
        // SAFETY: the next allocator's malloc, with the caller's argument.
        Some(n) => unsafe { (n.malloc)(size) },
        None => boot_alloc(size),
    }
}

/// `free(3)`.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || is_boot(p) {
        return;
    }
    if let Some(h) = local_heap::holding(p) {
        h.free(p);
        return;
    }
    if let Some((st, block)) = block_of(p) {
        free_block(st, p, block);
        return;
    }
    if let Some(n) = next() {
        // SAFETY: `p` came from the next allocator (not ours, not the boot buffer).
        unsafe { (n.free)(p) };
    }
}

/// `calloc(3)`: arena memory is handed out zeroed, so a large block needs no clearing.
#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        // SAFETY: this thread's errno slot.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return std::ptr::null_mut();
    };
    if let Some(h) = local() {
        let p = h.alloc(total, 16);
        if !p.is_null() {
            // A freed block reused holds what it held.
            // SAFETY: `p` is a block of at least `total` bytes, ours until returned.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, total) };
        }
        return p;
    }
    if let Some(st) = placing() {
        if let Some(p) = place(st, total, 16) {
            if total < st.min_bytes && !p.is_null() {
                // A small block (of any size below `min_bytes`, pages-long ones too) may be a
                // freed one reused, holding what it held; blocks of pages of their own come
                // fresh (zero) from the arena. (Zeroing only blocks under a page let
                // python's calloc'd arena map read old bytes: it took a malloc block for one
                // of its pools, and crashed.)
                // SAFETY: `p` is a block of at least `total` bytes, ours until returned.
                unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, total) };
            }
            return p;
        }
    }
    match next() {
        // SAFETY: the next allocator's calloc, with the caller's arguments.
        Some(nx) => unsafe { (nx.calloc)(n, size) },
        // The boot buffer is static and never reused: already zero.
        None => boot_alloc(total),
    }
}

/// `realloc(3)`.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    if is_boot(p) {
        // Moved out of the boot buffer; the old block's true size is unknown, so copy what
        // fits in the buffer after it.
        let q = malloc(size);
        if !q.is_null() {
            let avail = (BOOT.0.get() as usize + (1 << 16)) - p as usize;
            // SAFETY: both ranges are valid for the lengths copied and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), size.min(avail)) };
        }
        return q;
    }
    if let Some(h) = local_heap::holding(p) {
        if size == 0 {
            h.free(p);
            return std::ptr::null_mut();
        }
        // From wherever this thread's blocks come now.
        let q = malloc(size);
        if !q.is_null() {
            // SAFETY: `p` holds `usable_size` bytes and `q` at least `size`; distinct blocks.
            unsafe {
                std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), h.usable_size(p).min(size));
            };
            h.free(p);
        }
        return q;
    }
    if let Some((st, block)) = block_of(p) {
        return realloc_block(st, p, block, size);
    }
    let Some(n) = next() else { return std::ptr::null_mut() };
    if let Some(st) = placing() {
        // A block glibc made before routing began (or an over-aligned one): move it into
        // the arena.
        if let Some(q) = place(st, size, 16).filter(|q| !q.is_null()) {
            // SAFETY: `p` is a live block of the next allocator of at least `old` bytes; `q`
            // is a fresh block of at least `size` bytes.
            unsafe {
                let old = (n.usable_size)(p);
                std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size));
                (n.free)(p);
            }
            return q;
        }
    }
    // SAFETY: `p` came from the next allocator.
    unsafe { (n.realloc)(p, size) }
}

fn realloc_block(st: &State, p: *mut c_void, block: Block, size: usize) -> *mut c_void {
    if crate::state::FORKED.load(Relaxed) {
        // In a child sharing its parent's arena: no runtime to resize the block with, so a
        // new (ordinary) block, the old one left alone.
        let old = match block {
            Block::Small(n) | Block::Large(n) => n,
        };
        if size == 0 {
            return std::ptr::null_mut();
        }
        let q = malloc(size);
        if !q.is_null() {
            // SAFETY: `p` holds `old` bytes (a copy of the parent's block), `q` at least
            // `size`; distinct blocks.
            unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size)) };
        }
        return q;
    }
    if size == 0 {
        free_block(st, p, block);
        return std::ptr::null_mut();
    }
    let len = match block {
        // Still fits, and not so small that the block wastes most of itself.
        Block::Small(n) if size <= n && size > n / 2 => return p,
        Block::Small(n) => {
            let q = malloc(size);
            if !q.is_null() {
                // SAFETY: `p` holds `n` bytes, `q` at least `size`; distinct blocks.
                unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), n.min(size)) };
                free_block(st, p, block);
            }
            return q;
        }
        Block::Large(len) => len,
    };
    let Some(new) = page_round(size) else { return std::ptr::null_mut() };
    if new <= len {
        if new < len && st.free(p as usize + new, len - new).is_ok() {
            st.set_block(p as usize, Some(new));
        }
        return p;
    }
    if st.grow_in_place(p as usize, len, new) {
        st.set_block(p as usize, Some(new));
        return p;
    }
    let q = malloc(size);
    if !q.is_null() {
        // SAFETY: `p` holds `len` bytes, `q` at least `size > len`; distinct blocks.
        unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), len) };
        free_block(st, p, block);
    }
    q
}

/// `reallocarray(3)`.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarded with the caller's contract.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            // SAFETY: this thread's errno slot.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            std::ptr::null_mut()
        }
    }
}

/// `memalign(3)`.
#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if let Some(h) = local().filter(|_| align.is_power_of_two()) {
        return h.alloc(size, align);
    }
    if align.is_power_of_two() {
        if let Some(p) = placing().and_then(|st| place(st, size, align)) {
            return p;
        }
    }
    match next() {
        // SAFETY: the next allocator's memalign, with the caller's arguments.
        Some(n) => unsafe { (n.memalign)(align, size) },
        None if align <= 16 => boot_alloc(size),
        None => std::ptr::null_mut(),
    }
}

/// `aligned_alloc(3)`.
#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    memalign(align, size)
}

/// `posix_memalign(3)`.
///
/// # Safety
/// As the C function: `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = memalign(align, size);
    if p.is_null() && size != 0 {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a valid place for the result.
    unsafe { *out = p };
    0
}

/// `valloc(3)`.
#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    memalign(PAGE_SIZE, size)
}

/// `pvalloc(3)`.
#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    memalign(PAGE_SIZE, page_round(size).unwrap_or(usize::MAX))
}

/// `malloc_usable_size(3)`.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() || is_boot(p) {
        return 0;
    }
    if let Some(h) = local_heap::holding(p) {
        return h.usable_size(p);
    }
    if let Some((_, block)) = block_of(p) {
        return block.size();
    }
    // SAFETY: `p` came from the next allocator.
    next().map_or(0, |n| unsafe { (n.usable_size)(p) })
}
