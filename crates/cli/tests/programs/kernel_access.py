"""System calls on cluster memory, and the mmap family through the C library: read(2) into a
routed buffer, write(2) from one whose pages were evicted, mmap / mremap / madvise / munmap
with the kernel's semantics. Prints OK lines; any mismatch raises."""
import ctypes
import hashlib
import os
import sys
import tempfile

MB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_RW, MAP_PRIVATE_ANON, MREMAP_MAYMOVE, MADV_DONTNEED = 3, 0x22, 1, 4

# read(2) into a routed buffer, and write(2) from it after its pages went to the host.
data = os.urandom(16 * MB)
with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "src")
    with open(src, "wb") as f:
        f.write(data)
    buf = bytearray(16 * MB)
    with open(src, "rb", buffering=0) as f:
        assert f.readinto(buf) == len(buf)
    assert hashlib.sha256(buf).digest() == hashlib.sha256(data).digest(), "read(2) into cluster memory"
    print("OK read into cluster memory")
    filler = bytearray(b"\x01" * (32 * MB))  # pushes buf's pages out of local memory
    del filler
    dst = os.path.join(d, "dst")
    with open(dst, "wb", buffering=0) as f:
        assert f.write(buf) == len(buf)
    with open(dst, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest(), "write(2) from it"
    print("OK write from evicted cluster memory")

# The mmap family, called through the C library as a C program would.
size = 4 * MB
p = libc.mmap(None, size, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
assert p not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
pattern = bytes(range(256)) * (size // 256)
ctypes.memmove(p, pattern, size)
q = libc.mremap(p, size, 4 * size, MREMAP_MAYMOVE)
assert q not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
assert ctypes.string_at(q, size) == pattern, "mremap keeps the contents"
assert ctypes.string_at(q + size, 3 * size) == bytes(3 * size), "mremap's new part reads as zeros"
print("OK mremap")


def mapping_size(addr):
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return hi - lo
    raise AssertionError("no mapping holds %#x" % addr)


# Routed: the memory lies in the cluster-memory arena, far larger than anything else here.
assert mapping_size(q) >= 64 << 30, "the mapping is not in the cluster-memory arena"
print("OK routed")
assert libc.madvise(q, MB, MADV_DONTNEED) == 0
assert ctypes.string_at(q, MB) == bytes(MB), "MADV_DONTNEED drops the contents"
assert ctypes.string_at(q + MB, MB) == pattern[MB : 2 * MB], "only the advised range"
print("OK madvise")
r = libc.mremap(q, 4 * size, size, 0)
assert r == q, "shrinking stays in place"
assert libc.munmap(q, size) == 0
print("OK munmap")
sys.stdout.flush()
