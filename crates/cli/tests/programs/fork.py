"""fork under clustermem run once the parent's data has been evicted (run it with a local
limit below 8 MiB): a child that execs works; a child that touches its parent's cluster
memory is stopped with status 70 and a message."""
import os
import subprocess
import sys

big = bytearray(b"x" * (8 << 20))
print(subprocess.run(["/bin/echo", "subprocess ok"], capture_output=True, text=True).stdout.strip())
pid = os.fork()
if pid == 0:
    total = sum(big[:: 1 << 12])  # the parent's cluster memory
    os._exit(0 if total else 1)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
assert big[123] == ord("x")
print("parent ok")
sys.stdout.flush()
