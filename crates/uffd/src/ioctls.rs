//! The userfaultfd ABI by hand: `#[repr(C)]` mirrors of `<linux/userfaultfd.h>` with size
//! asserts, and ioctl numbers with their `_IOWR` formulas recomputed at compile time.

/// `_IOC(dir, type, nr, size)` from `<asm-generic/ioctl.h>`.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const UFFDIO: u64 = 0xAA;

pub(crate) const UFFD_API: u64 = 0xAA;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

/// `struct uffdio_move` (Linux 6.8+).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);

/// `struct uffd_msg` with the pagefault member of its union spelled out (the only one we
/// read; other events are told apart by `event` and ignored).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub pf_flags: u64,
    pub pf_address: u64,
    pub pf_ptid: u32,
    pub pad: u32,
}
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// `struct uffdio_poison` (Linux 6.6+).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioPoison {
    pub range: UffdioRange,
    pub mode: u64,
    pub updated: i64,
}
const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);

/// `struct pm_scan_arg` from `<linux/fs.h>` (Linux 6.7+).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)`, on `/dev/userfaultfd`.
pub(crate) const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, UFFDIO, 0x00, 0);
/// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub(crate) const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, 24);
/// `UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)`.
pub(crate) const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, 32);
/// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)`.
pub(crate) const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, 16);
/// `UFFDIO_WAKE = _IOR(0xAA, 0x02, struct uffdio_range)`.
pub(crate) const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, 16);
/// `UFFDIO_COPY = _IOWR(0xAA, 0x03, struct uffdio_copy)`.
pub(crate) const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, 40);
/// `UFFDIO_MOVE = _IOWR(0xAA, 0x05, struct uffdio_move)`.
pub(crate) const UFFDIO_MOVE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x05, 40);
/// `UFFDIO_WRITEPROTECT = _IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub(crate) const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x06, 24);
/// `UFFDIO_POISON = _IOWR(0xAA, 0x08, struct uffdio_poison)`.
pub(crate) const UFFDIO_POISON: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x08, 32);
/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub(crate) const PAGEMAP_SCAN: u64 = ioc(IOC_READ | IOC_WRITE, b'f' as u64, 16, 96);

// The numbers as the kernel headers spell them, so a typo in the formula cannot hide.
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub(crate) const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub(crate) const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
pub(crate) const PAGE_IS_SWAPPED: u64 = 1 << 4;
