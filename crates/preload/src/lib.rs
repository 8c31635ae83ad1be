//! `libclustermem_preload.so`: loaded into a program by `clustermem run` (LD_PRELOAD), it
//! starts a clustermem runtime inside the program and routes the program's large anonymous
//! memory into cluster memory, bounded locally by `--local-mem`.
//!
//! How: the constructor reserves one large region (the arena: address space only, host
//! memory committed per slab as allocations need it) and the hooks carve it up —
//! `mmap` of private anonymous read-write memory of at least `CLUSTERMEM_MIN_BYTES`
//! (`hooks.rs`) and, under glibc's allocator, malloc blocks of that size (`malloc.rs`).
//! munmap / MADV_DONTNEED free memory locally and on the host; mlock / mlockall lock all but
//! the arena. Everything else (small,
//! file-backed, shared, stack, executable mappings) stays as the kernel makes it.
//!
//! Configuration comes from the environment `clustermem run` sets:
//! `CLUSTERMEM_HOSTS` (required; without it the library does nothing), `CLUSTERMEM_LOCAL_MEM`,
//! `CLUSTERMEM_ARENA`, `CLUSTERMEM_MIN_BYTES` (bytes), `CLUSTERMEM_LOW_LATENCY` (`1`),
//! `CLUSTERMEM_FLUSH_INTERVAL_MS`, `CLUSTERMEM_WRITEBACK` (`line|page`),
//! `CLUSTERMEM_DIRTY_TRACKING` (`sync|async`), `CLUSTERMEM_PREFETCH`,
//! `CLUSTERMEM_REDUNDANCY` (`none|replicate:N|erasure:K+M`),
//! `CLUSTERMEM_STATS_DIR` (each process writes its figures there: see `stats_file`).
//!
//! fork: the runtime's thread does not survive a fork. While every page of the arena that
//! holds data is resident (none was ever evicted) and they are few (a quarter of
//! `--local-mem`), the child gets a copy-on-write copy of the arena as ordinary memory
//! (eviction pauses for the fork): shells' subshells, wrapper scripts and small forking
//! programs work. Otherwise the arena is MADV_DONTFORK and a child cannot see its parent's
//! cluster memory: a child that only execs (the common case: subprocesses) is fine and gets
//! a runtime of its own; a child that touches cluster memory is stopped with a message
//! saying so (exit status 70), never handed zeros.

mod arena;
mod hooks;
mod local_heap;
mod malloc;
mod small;
mod state;
mod stats_file;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clustermem_runtime::{
    DirtyTracking, PrefetchMode, Redundancy, Runtime, RuntimeConfig, WritebackMode, PAGE_SIZE,
};

use state::{bypassed, set_bypass, State, ARENA_BASE, ARENA_LEN, FORKED, SHARED_WITH_CHILD, STATE};

/// Exit status of a process this library could not set up (as `env` and `timeout` use 125).
pub const SETUP_FAILED: i32 = 125;
/// Exit status of a forked child that touched its parent's cluster memory.
pub const FORK_TOUCHED_ARENA: i32 = 70;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut libc::c_void;
    fn __libc_free(p: *mut libc::c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut libc::c_void;
    fn __libc_realloc(p: *mut libc::c_void, size: usize) -> *mut libc::c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut libc::c_void;
}

/// This library's own allocations (the runtime's tables, its messages) go straight to
/// glibc's allocator, never to the program's malloc: the fault handler must not take a lock
/// of the program's allocator that a thread waiting on a fault may hold, and its memory must
/// not be routed into the region it serves. (std allocates a few things, such as a thread's
/// parking state, through `System`, that is `malloc`, past this: see `local_heap`.)
struct LibcAllocator;

// SAFETY: glibc's allocator returns blocks of at least the size asked, aligned to 16 bytes
// (memalign for larger alignments), or null; blocks are freed exactly once by `dealloc`.
unsafe impl GlobalAlloc for LibcAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls into glibc's allocator.
        unsafe {
            if layout.align() <= 16 {
                __libc_malloc(layout.size()).cast()
            } else {
                __libc_memalign(layout.align(), layout.size()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: glibc's calloc; a large block comes fresh from mmap, already zero and
            // untouched, which matters for the runtime's page tables of a large arena.
            return unsafe { __libc_calloc(1, layout.size()).cast() };
        }
        // SAFETY: allocate as above, then clear.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above.
        unsafe { __libc_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: `ptr` came from glibc's allocator with alignment <= 16.
            return unsafe { __libc_realloc(ptr.cast(), new_size).cast() };
        }
        // SAFETY: the default path: allocate, copy the smaller size, free.
        unsafe {
            let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[global_allocator]
static ALLOCATOR: LibcAllocator = LibcAllocator;

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

fn env_bytes(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v:?} is not a number of bytes")),
        Err(_) => Ok(default),
    }
}

fn env_parse<T: std::str::FromStr<Err: std::fmt::Display>>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|e| format!("{name}: {e}")),
        Err(_) => Ok(default),
    }
}

fn die(what: &str) -> ! {
    eprintln!("clustermem: {what}");
    // SAFETY: ends the process without running the program's exit handlers, which may
    // expect a program that started.
    unsafe { libc::_exit(SETUP_FAILED) }
}

extern "C" fn init() {
    let Ok(hosts) = std::env::var("CLUSTERMEM_HOSTS") else { return };
    set_bypass(true);
    let parse = || -> Result<(RuntimeConfig, u64, u64), String> {
        let config = RuntimeConfig {
            hosts: hosts.split(',').filter(|h| !h.is_empty()).map(str::to_string).collect(),
            local_mem_bytes: env_bytes("CLUSTERMEM_LOCAL_MEM", 256 << 20)?,
            low_latency: std::env::var("CLUSTERMEM_LOW_LATENCY").is_ok_and(|v| v == "1"),
            flush_interval: match env_bytes("CLUSTERMEM_FLUSH_INTERVAL_MS", 100)? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            writeback: env_parse("CLUSTERMEM_WRITEBACK", WritebackMode::default())?,
            dirty_tracking: env_parse("CLUSTERMEM_DIRTY_TRACKING", DirtyTracking::default())?,
            prefetch: env_parse("CLUSTERMEM_PREFETCH", PrefetchMode::default())?,
            redundancy: env_parse("CLUSTERMEM_REDUNDANCY", Redundancy::None)?,
            on_handler_start: Some(|| set_bypass(true)),
            ..RuntimeConfig::default()
        };
        let arena = env_bytes("CLUSTERMEM_ARENA", 256 << 30)?;
        let min = env_bytes("CLUSTERMEM_MIN_BYTES", 256 << 10)?.max(PAGE_SIZE as u64);
        Ok((config, arena, min))
    };
    let (config, arena, min) = parse().unwrap_or_else(|e| die(&e));
    if config.hosts.is_empty() {
        die("CLUSTERMEM_HOSTS names no memory host");
    }
    let span_bytes = config.slab_bytes;
    let runtime: &'static Runtime = Box::leak(Box::new(
        Runtime::start(config).unwrap_or_else(|e| die(&format!("cannot start cluster memory: {e}"))),
    ));
    let arena = usize::try_from(arena).unwrap_or(usize::MAX);
    let region = runtime.reserve(arena).unwrap_or_else(|e| die(&format!("cannot reserve the arena: {e}")));
    ARENA_BASE.store(region.as_ptr() as usize, Relaxed);
    ARENA_LEN.store(region.len(), Relaxed);
    // Out of forked children, which could not reach its pages, but around a fork that may
    // share it (see the crate docs).
    if let Err(e) = arena_to_children(false) {
        die(&format!("madvise(MADV_DONTFORK) on the arena: {e}"));
    }
    let min = usize::try_from(min).unwrap_or(usize::MAX);
    if STATE.set(State::new(runtime, region, min, span_bytes)).is_err() {
        die("initialised twice");
    }
    // SAFETY: registers plain functions with no captured state.
    unsafe {
        libc::pthread_atfork(Some(before_fork), Some(after_fork_in_parent), Some(after_fork_in_child));
    }
    if let Some(dir) = std::env::var_os("CLUSTERMEM_STATS_DIR") {
        stats_file::start(dir);
    }
    set_bypass(false);
}

/// Sets the arena's `MADV_DOFORK` (`share`) or `MADV_DONTFORK`.
fn arena_to_children(share: bool) -> std::io::Result<()> {
    let (base, len) = (ARENA_BASE.load(Relaxed), ARENA_LEN.load(Relaxed));
    let advice = if share { libc::MADV_DOFORK } else { libc::MADV_DONTFORK };
    // SAFETY: the arena is this library's mapping; the advice changes only what a child gets.
    // (The system call itself: the `madvise` hook keeps a program's DOFORK off the arena.)
    if unsafe { libc::syscall(libc::SYS_madvise, base, len, advice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Before a fork: the child shares the arena if the runtime says its copy would be
/// complete (and then evicts nothing until the fork is over).
extern "C" fn before_fork() {
    let Some(st) = state::active() else { return };
    // Bypassed: the call waits for the handler, which then touches this thread's parking
    // state (see `local_heap`).
    if bypassed(|| st.runtime.pause_eviction_for_fork()) {
        match arena_to_children(true) {
            Ok(()) => SHARED_WITH_CHILD.store(true, Relaxed),
            // The child goes without, as when its copy would be incomplete.
            Err(_) => bypassed(|| st.runtime.resume_eviction()),
        }
    }
}

extern "C" fn after_fork_in_parent() {
    // A forked child forking in turn has no runtime and nothing paused: its arena (if it
    // got one) stays as it is, shared with its own children.
    if FORKED.load(Relaxed) {
        return;
    }
    if SHARED_WITH_CHILD.swap(false, Relaxed) {
        if let Err(e) = arena_to_children(false) {
            // A later child would get an incomplete copy once pages are evicted.
            die(&format!("madvise(MADV_DONTFORK) on the arena after a fork: {e}"));
        }
        if let Some(st) = state::active() {
            bypassed(|| st.runtime.resume_eviction());
        }
    }
}

extern "C" fn after_fork_in_child() {
    FORKED.store(true, Relaxed);
    if SHARED_WITH_CHILD.load(Relaxed) {
        // The arena is here, as ordinary copy-on-write memory.
        return;
    }
    // SAFETY: installs a SIGSEGV handler; the struct is fully initialised before use.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_segv_in_child as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
    }
}

/// In a forked child: a fault on the (unmapped) arena gets a message and exit status 70;
/// any other fault gets the default action when it repeats (SA_RESETHAND).
extern "C" fn on_segv_in_child(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (base, len) = (ARENA_BASE.load(Relaxed), ARENA_LEN.load(Relaxed));
    if addr >= base && addr < base + len {
        let msg =
            b"clustermem: a forked child touched its parent's cluster memory, which a child cannot reach; \
under `clustermem run` a child may exec (subprocesses work) but not use the parent's memory after fork\n";
        // SAFETY: async-signal-safe calls with a static buffer.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(FORK_TOUCHED_ARENA);
        }
    }
}
