"""Builds Python structures several times larger than clustermem run's --local-mem and prints
their checksum; the same output is expected with and without clustermem. Peak RSS goes to
stderr."""
import hashlib
import resource
import sys

n = int(sys.argv[1])
squares = [i * i for i in range(n)]
names = {i: str(i) * 3 for i in range(n // 3)}
blobs = [bytes([i % 251]) * 4096 for i in range(n // 100)]
h = hashlib.sha256()
for x in squares:
    h.update(x.to_bytes(16, "little"))
for k in names:
    h.update(names[k].encode())
for b in blobs:
    h.update(b)
squares.sort(key=lambda v: -v)
h.update(squares[0].to_bytes(16, "little"))
print(h.hexdigest())
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
