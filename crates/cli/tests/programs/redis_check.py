"""Fills a Redis server with keys whose values derive from their names, then reads every key
back (these and redis-benchmark's) and checks it. Usage: redis_check.py PORT KEYS VALUE_BYTES
BENCH_VALUE_BYTES. Prints the counts checked; any mismatch exits non-zero. With
REDIS_CHECK_PHASES=1 in the environment, says on stderr how long each phase took."""
import hashlib
import os
import socket
import sys
import time

started = last = time.monotonic()


def phase(name):
    """Reports the phase just ended (with REDIS_CHECK_PHASES=1)."""
    global last
    now = time.monotonic()
    if os.environ.get("REDIS_CHECK_PHASES") == "1":
        print("phase %-22s %6.2f s (at %.2f s)" % (name, now - last, now - started), file=sys.stderr)
    last = now

port, keys, size, bench_size = (int(a) for a in sys.argv[1:5])
sock = socket.create_connection(("127.0.0.1", port))
stream = sock.makefile("rb")


def command(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def reply():
    line = stream.readline()
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b":"):
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else stream.read(n + 2)[:-2]
    if kind == b"*":
        return [reply() for _ in range(int(rest))]
    raise RuntimeError("bad reply %r" % line)


def value(i):
    seed = hashlib.sha256(b"%d" % i).digest()
    return (seed * (size // len(seed) + 1))[:size]


def pipeline(cmds):
    sock.sendall(b"".join(cmds))
    return [reply() for _ in cmds]


BATCH = 500
for start in range(0, keys, BATCH):
    pipeline([command("SET", "cm:%d" % i, value(i)) for i in range(start, min(keys, start + BATCH))])
phase("write own keys")
bad = 0
for start in range(0, keys, BATCH):
    got = pipeline([command("GET", "cm:%d" % i) for i in range(start, min(keys, start + BATCH))])
    bad += sum(g != value(start + j) for j, g in enumerate(got))
phase("read own keys")
if bad:
    sys.exit("%d of our keys read back wrong" % bad)
# redis-benchmark's SET writes one random value of -d bytes, the same for every key
# key:NNNNNNNNNNNN of a run: every one must read back as that value.
cursor, bench_keys = b"0", []
while True:
    cursor, found = pipeline([command("SCAN", cursor, "MATCH", "key:*", "COUNT", 1000)])[0]
    bench_keys += found
    if cursor == b"0":
        break
phase("scan bench keys")
expected = None
for start in range(0, len(bench_keys), BATCH):
    got = pipeline([command("GET", k) for k in bench_keys[start : start + BATCH]])
    expected = expected or got[0]
    bad += sum(g != expected or len(g) != bench_size for g in got)
phase("read bench keys")
if bad or not bench_keys:
    sys.exit("%d of redis-benchmark's %d keys read back wrong" % (bad, len(bench_keys)))
print("verified", keys, "keys and", len(bench_keys), "redis-benchmark keys")
