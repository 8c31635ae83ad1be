"""fork under clustermem run while all the program's data is resident: the child gets a
copy of its parent's memory (reads it, and its stores stay its own), and the parent goes on
paging afterwards. Prints what it checked; any failure exits non-zero."""
import hashlib
import os

data = bytearray(os.urandom(1 << 20))  # cluster memory (a block of its own), resident
digest = hashlib.sha256(data).hexdigest()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    seen = hashlib.sha256(data).hexdigest()
    data[0] ^= 0xFF  # the child's copy only
    grandchild = os.fork()  # a child of the child gets the copy too
    if grandchild == 0:
        os._exit(0 if data[0] != (data[0] ^ 0xFF) and hashlib.sha256(data).hexdigest() != seen else 1)
    _, status = os.waitpid(grandchild, 0)
    os.write(w, b"%s %d" % (seen.encode(), os.waitstatus_to_exitcode(status)))
    os._exit(0)
os.close(w)
seen, grandchild_exit = os.read(r, 256).split()
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert seen.decode() == digest, "the child read its parent's memory wrong"
assert grandchild_exit == b"0", "the grandchild did not see the child's copy"
assert hashlib.sha256(data).hexdigest() == digest, "the child's store reached the parent"
print("child read the parent's memory")
# Paging goes on after the fork: four times --local-mem more, read back.
blocks = [bytearray(os.urandom(1 << 20)) for _ in range(4 * int(os.environ["LOCAL_MIB"]))]
sums = [hashlib.sha256(b).digest() for b in blocks]
assert all(hashlib.sha256(b).digest() == s for b, s in zip(blocks, sums))
print("parent ok")
