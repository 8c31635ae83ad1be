//! The memory-mapping calls of the program, routed: large private anonymous read-write
//! mappings are placed in the arena; `munmap`, `mremap` and `madvise` on arena memory behave
//! as the kernel's would on anonymous memory. Everything else goes to the kernel unchanged.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use libc::{c_int, c_void, off_t};

use crate::state::{active, page_round, PlaceError, State};
use clustermem_runtime::PAGE_SIZE;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(e: c_int) -> *mut c_void {
    set_errno(e);
    libc::MAP_FAILED
}

/// Says once per process why a call on arena memory was refused.
fn refuse_once(flag: &AtomicBool, what: &str) {
    if !flag.swap(true, Relaxed) {
        eprintln!("clustermem: {what}");
    }
}

unsafe fn sys_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    // SAFETY: the caller's arguments go to the kernel unchanged; it checks them.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void }
}

unsafe fn sys_munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: as `sys_mmap`.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int }
}

/// Flags that keep a mapping out of the arena: it must stay what the kernel makes of it.
const KEEP_LOCAL: c_int =
    libc::MAP_STACK | libc::MAP_GROWSDOWN | libc::MAP_HUGETLB | libc::MAP_32BIT | libc::MAP_LOCKED;

/// The routing decision of `mmap`: `None` to pass the call to the kernel.
fn route_mmap(st: &State, addr: usize, len: usize, prot: c_int, flags: c_int) -> Option<*mut c_void> {
    static FILE_OVER_ARENA: AtomicBool = AtomicBool::new(false);
    let anon_private = flags & libc::MAP_ANONYMOUS != 0 && flags & 0x0f == libc::MAP_PRIVATE;
    if flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0 {
        if !st.overlaps(addr, len) {
            return None;
        }
        if flags & libc::MAP_FIXED_NOREPLACE != 0 {
            return Some(fail(libc::EEXIST));
        }
        let len = page_round(len)?;
        if !anon_private || !st.contains(addr, len) || !addr.is_multiple_of(PAGE_SIZE) {
            refuse_once(
                &FILE_OVER_ARENA,
                "a MAP_FIXED mapping other than private anonymous memory over cluster memory is not supported (ENOMEM)",
            );
            return Some(fail(libc::ENOMEM));
        }
        // Fresh anonymous memory in place of what was there: zeros, protected as asked.
        if st.allocate_at(addr, len).is_err() {
            return Some(fail(libc::ENOMEM));
        }
        if prot != libc::PROT_READ | libc::PROT_WRITE {
            // SAFETY: the range lies inside the arena, which this library owns.
            if unsafe { libc::mprotect(addr as *mut c_void, len, prot) } != 0 {
                return Some(libc::MAP_FAILED);
            }
        }
        return Some(addr as *mut c_void);
    }
    let routable = anon_private && flags & KEEP_LOCAL == 0 && prot == libc::PROT_READ | libc::PROT_WRITE;
    if !routable || len < st.min_bytes {
        return None;
    }
    let len = page_round(len)?;
    match st.allocate(len, PAGE_SIZE) {
        Ok(addr) => Some(addr as *mut c_void),
        Err(PlaceError::ArenaFull) => None,
        Err(PlaceError::Refused(e)) => {
            crate::state::say_refused(format_args!("a mapping of {len} bytes was refused: {e}"));
            Some(fail(libc::ENOMEM))
        }
    }
}

/// `mmap(2)`.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if let Some(routed) = active().and_then(|st| route_mmap(st, addr as usize, len, prot, flags)) {
        return routed;
    }
    // SAFETY: the caller's arguments, unchanged.
    unsafe { sys_mmap(addr, len, prot, flags, fd, off) }
}

/// `mmap64(2)`: the same call on 64-bit Linux.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    // SAFETY: forwarded with the caller's contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `munmap(2)`: arena memory is freed here and on its host; the rest goes to the kernel.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let a = addr as usize;
    if let Some(st) = active().filter(|st| st.overlaps(a, len)) {
        let Some(len) = page_round(len).filter(|&l| l > 0 && a.is_multiple_of(PAGE_SIZE)) else {
            set_errno(libc::EINVAL);
            return -1;
        };
        // The part inside the arena is ours; any part outside goes to the kernel.
        let start = a.max(st.base);
        let end = (a + len).min(st.base + st.len);
        if let Err(e) = st.free(start, end - start) {
            eprintln!("clustermem: munmap of cluster memory failed: {e}");
            set_errno(libc::EINVAL);
            return -1;
        }
        let mut rc = 0;
        if a < start {
            // SAFETY: a range outside the arena, as the caller gave it.
            rc |= unsafe { sys_munmap(addr, start - a) };
        }
        if a + len > end {
            // SAFETY: as above.
            rc |= unsafe { sys_munmap(end as *mut c_void, a + len - end) };
        }
        return rc;
    }
    // SAFETY: the caller's arguments, unchanged.
    unsafe { sys_munmap(addr, len) }
}

/// `mremap(2)`. C declares it variadic (the fifth argument exists only with MREMAP_FIXED);
/// on x86-64 and aarch64 a variadic caller passes it in the same register a fixed-arity
/// callee reads, so this signature receives it.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let a = old as usize;
    if let Some(st) = active().filter(|st| st.overlaps(a, old_len.max(1))) {
        return remap_in_arena(st, a, old_len, new_len, flags);
    }
    // SAFETY: the caller's arguments, unchanged.
    unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) as *mut c_void }
}

fn remap_in_arena(st: &State, a: usize, old_len: usize, new_len: usize, flags: c_int) -> *mut c_void {
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    let (Some(old), Some(new)) = (page_round(old_len), page_round(new_len)) else {
        return fail(libc::EINVAL);
    };
    if !a.is_multiple_of(PAGE_SIZE) || old == 0 || new == 0 || !st.contains(a, old) {
        return fail(libc::EINVAL);
    }
    if flags & !libc::MREMAP_MAYMOVE != 0 {
        refuse_once(
            &UNSUPPORTED,
            "mremap with MREMAP_FIXED or MREMAP_DONTUNMAP on cluster memory is not supported",
        );
        return fail(libc::EINVAL);
    }
    if new <= old {
        if new < old && st.free(a + new, old - new).is_err() {
            return fail(libc::EINVAL);
        }
        return a as *mut c_void;
    }
    if st.grow_in_place(a, old, new) {
        return a as *mut c_void;
    }
    if flags & libc::MREMAP_MAYMOVE == 0 {
        return fail(libc::ENOMEM);
    }
    let to = match st.allocate(new, PAGE_SIZE) {
        Ok(to) => to,
        Err(_) => return fail(libc::ENOMEM),
    };
    // SAFETY: both ranges lie in the arena, are handed out to this caller and do not overlap
    // (the new one was free); faults on either are served by the runtime.
    unsafe { std::ptr::copy_nonoverlapping(a as *const u8, to as *mut u8, old) };
    if st.free(a, old).is_err() {
        return fail(libc::ENOMEM);
    }
    to as *mut c_void
}

/// `madvise(2)`: on arena memory, advice that drops contents drops them here and on the host;
/// advice that would undo the arena's setup (huge pages, fork copying) is accepted and not
/// applied; the rest goes to the kernel.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let a = addr as usize;
    if let Some(st) = active().filter(|st| st.overlaps(a, len)) {
        let Some(len) = page_round(len).filter(|_| a.is_multiple_of(PAGE_SIZE) && st.contains(a, len.max(1)))
        else {
            set_errno(libc::EINVAL);
            return -1;
        };
        match advice {
            libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE => {
                if len > 0 && st.discard(a, len).is_err() {
                    set_errno(libc::EINVAL);
                    return -1;
                }
                return 0;
            }
            libc::MADV_HUGEPAGE | libc::MADV_DOFORK | libc::MADV_COLD | libc::MADV_PAGEOUT => return 0,
            _ => {}
        }
    }
    // SAFETY: the caller's arguments, unchanged.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as c_int }
}

/// Says once that locking leaves cluster memory out.
fn not_locked_once() {
    static SAID: AtomicBool = AtomicBool::new(false);
    refuse_once(
        &SAID,
        "mlock/mlockall: cluster memory stays paged by clustermem (bounded by --local-mem), not locked; the rest of the program's memory is locked as asked",
    );
}

unsafe fn sys_mlock2(addr: usize, len: usize, flags: c_int) -> c_int {
    // SAFETY: the kernel checks the range; locking changes no contents.
    unsafe { libc::syscall(libc::SYS_mlock2, addr, len, flags) as c_int }
}

/// Locks `addr..addr + len` but the arena's part of it (a locked page could not be evicted,
/// and the kernel would fault the whole range in to lock it).
fn lock_outside(st: &State, addr: usize, len: usize, flags: c_int) -> c_int {
    let end = addr.saturating_add(len);
    let (base, arena_end) = st.bounds();
    let mut rc = 0;
    for (s, e) in [(addr, end.min(base)), (addr.max(arena_end), end)] {
        if s < e && rc == 0 {
            // SAFETY: a part of the caller's range, which the kernel checks.
            rc = unsafe { sys_mlock2(s, e - s, flags) };
        }
    }
    rc
}

/// `mlock(2)`: cluster memory in the range is left out (see [`lock_outside`]).
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mlock(addr: *const c_void, len: usize) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { mlock2(addr, len, 0) }
}

/// `mlock2(2)`: as `mlock`.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mlock2(addr: *const c_void, len: usize, flags: libc::c_uint) -> c_int {
    let (a, flags) = (addr as usize, flags as c_int);
    match active().filter(|st| st.overlaps(a, len)) {
        Some(st) => {
            not_locked_once();
            lock_outside(st, a, len, flags)
        }
        // SAFETY: the caller's arguments, unchanged.
        None => unsafe { sys_mlock2(a, len, flags) },
    }
}

/// `mlockall(2)`: `MCL_FUTURE` as the kernel does it; `MCL_CURRENT` locks every mapping but
/// the ones clustermem pages (those registered with its userfaultfd, `um` in smaps' VmFlags:
/// the arena and the handler's staging area), which the kernel would otherwise fault in
/// whole, all 256 GiB of the arena's reservation, and could never evict from again.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mlockall(flags: c_int) -> c_int {
    if active().is_none() {
        // SAFETY: the caller's argument, unchanged.
        return unsafe { libc::syscall(libc::SYS_mlockall, flags) as c_int };
    }
    if flags & !(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) != 0
        || flags & (libc::MCL_CURRENT | libc::MCL_FUTURE) == 0
    {
        set_errno(libc::EINVAL);
        return -1;
    }
    let ranges = if flags & libc::MCL_CURRENT != 0 {
        match mappings_to_lock() {
            Ok(r) => r,
            Err(e) => {
                set_errno(e);
                return -1;
            }
        }
    } else {
        Vec::new()
    };
    if flags & libc::MCL_FUTURE != 0 {
        // SAFETY: flags the kernel checks; future mappings are the program's own (arena
        // memory is carved from the existing reservation, not mapped anew).
        let rc = unsafe { libc::syscall(libc::SYS_mlockall, flags & !libc::MCL_CURRENT) as c_int };
        if rc != 0 {
            return rc;
        }
    }
    if flags & libc::MCL_CURRENT == 0 {
        return 0;
    }
    not_locked_once();
    let lock_flags = if flags & libc::MCL_ONFAULT != 0 { libc::MLOCK_ONFAULT as c_int } else { 0 };
    for (s, e) in ranges {
        // SAFETY: a mapping of this process; locking changes no contents.
        if unsafe { sys_mlock2(s, e - s, lock_flags) } != 0 && errno() == libc::EPERM {
            return -1;
        }
        // Other failures are of faulting the range in (a PROT_NONE mapping, the vsyscall
        // page), which `mlockall` ignores: the range is locked as far as it can be.
    }
    0
}

/// The mappings `mlockall(MCL_CURRENT)` locks: all but the ones registered with clustermem's
/// userfaultfd. Err(errno) if they cannot be read, or exceed what the caller may lock.
fn mappings_to_lock() -> Result<Vec<(usize, usize)>, c_int> {
    let smaps = crate::state::bypassed(|| std::fs::read_to_string("/proc/self/smaps"))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?;
    // Every mapping but ours, from each mapping's first line (`START-END perms ...`) and its
    // VmFlags line.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut mapping = None;
    for line in smaps.lines() {
        if let Some(vm_flags) = line.strip_prefix("VmFlags:") {
            let paged_by_us = vm_flags.split_whitespace().any(|f| f == "um");
            if let (Some(range), false) = (mapping.take(), paged_by_us) {
                ranges.push(range);
            }
        } else if let Some((s, e)) = line.split_whitespace().next().and_then(|r| r.split_once('-')) {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                mapping = Some((s, e));
            }
        }
    }
    // The kernel's own check: more than RLIMIT_MEMLOCK without the privilege to exceed it
    // (root's, as an approximation of CAP_IPC_LOCK) is refused.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit for the call to fill.
    let limited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
        // SAFETY: geteuid has no preconditions.
        && unsafe { libc::geteuid() } != 0;
    let total: usize = ranges.iter().map(|(s, e)| e - s).sum();
    if limited && total as u64 > limit.rlim_cur {
        return Err(if limit.rlim_cur == 0 { libc::EPERM } else { libc::ENOMEM });
    }
    Ok(ranges)
}
