"""Run with jemalloc preloaded after clustermem's library (its own allocator, as redis has),
purging freed memory at once: two threads free 1 MiB blocks over and over, each free a call
into the runtime from a thread that then waits for the fault handler, while the main thread
churns through memory far beyond the local limit, so cold pages (the waiting threads'
parking state among them, were it in cluster memory) are evicted. Usage: own_allocator.py N.
Prints a digest of what the main thread built; the caller compares it with an ordinary run."""
import hashlib
import sys
import threading

stop = False


def freer():
    while not stop:
        block = bytearray(1 << 20)
        block[::4096] = b"x" * 256
        del block


threads = [threading.Thread(target=freer) for _ in range(2)]
for t in threads:
    t.start()
digest = hashlib.sha256()
keep = []
for i in range(int(sys.argv[1])):
    keep.append(bytes([i % 251]) * 3000)
    if len(keep) > 20000:
        for k in keep[::97]:
            digest.update(k)
        keep = keep[10000:]
stop = True
for t in threads:
    t.join()
print(digest.hexdigest())
