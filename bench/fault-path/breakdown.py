"""Splits remote faults traced by bench/fault-path/trace.sh into their steps.

usage: breakdown.py NAME TRACE [NAME TRACE ...]   (ftrace text output, one file per column)

The roles are found by what each thread does, so the same code reads clustermem's trace and
the floor's: the program is the thread with the most page faults, the handler the one that
calls UFFDIO_COPY, the host the one that sends page-sized replies."""
import re
import statistics
import sys
from collections import Counter

UFFDIO_COPY = "0xc028aa03"
EVENT = re.compile(r"^\s*(.+)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): ([a-z_]+)[:(]? ?(.*)$")
STEPS = ["fault", "read", "send", "sent", "srecv", "ssend", "ssent", "recv", "copy", "copied", "run"]
LABELS = {
    "read": "fault -> handler reads it",
    "send": "read -> request send starts",
    "sent": "request send call",
    "srecv": "sent -> host has it",
    "ssend": "host's work",
    "ssent": "host's reply send call",
    "recv": "reply sent -> handler has it",
    "copy": "handler's work before UFFDIO_COPY",
    "copied": "UFFDIO_COPY (install + wake)",
    "run": "woken -> program runs",
}


def returned(rest):
    """The value of a `-> 0x...` syscall exit (negative for an error), or None for an entry."""
    if not rest.startswith("-> 0x"):
        return None
    value = int(rest[3:], 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def load(path):
    events = []
    for line in open(path, errors="replace"):
        m = EVENT.match(line)
        if m:
            _comm, tid, cpu, ts, kind, rest = m.groups()
            events.append((float(ts) * 1e6, int(tid), int(cpu), kind, rest))
    faults = Counter(e[1] for e in events if e[3] == "page_fault_user")
    handlers = Counter(e[1] for e in events if e[3] == "sys_ioctl" and UFFDIO_COPY in e[4])
    senders = Counter(
        e[1] for e in events if e[3] == "sys_sendto" and (returned(e[4]) or 0) >= 4096
    )
    if not faults or not handlers:
        sys.exit(f"{path}: no faults or no UFFDIO_COPY traced (was the trace taken too early?)")
    app = faults.most_common(1)[0][0]
    handler = handlers.most_common(1)[0][0]
    host = next((t for t, _ in senders.most_common() if t != handler), None)
    if host is None:
        sys.exit(f"{path}: no thread sent a page-sized reply")
    return events, app, handler, host


def steps(events, app, handler, host):
    """One dict per remote fault: step -> time (us), plus the CPUs each role ran on."""
    done, cur = [], None
    for ts, tid, cpu, kind, rest in events:
        if kind == "page_fault_user" and tid == app:
            if cur and "run" in cur:
                done.append(cur)
            cur = {"fault": ts, "cpus": (cpu, None, None)}
            continue
        if cur is None:
            continue
        ret = returned(rest)
        have = cur.keys()
        if tid == handler:
            if kind == "sys_read" and ret == 32 and "read" not in have:
                cur["read"], cur["cpus"] = ts, (cur["cpus"][0], cpu, cur["cpus"][2])
            elif kind == "sys_sendto" and ret is None and "read" in have and "send" not in have:
                cur["send"] = ts
            elif kind == "sys_sendto" and ret is not None and "send" in have and "sent" not in have:
                cur["sent"] = ts
            elif kind in ("sys_recvfrom", "sys_read") and (ret or 0) >= 4096 and "ssend" in have and "recv" not in have:
                cur["recv"] = ts
            elif kind == "sys_ioctl" and UFFDIO_COPY in rest and "recv" in have and "copy" not in have:
                cur["copy"] = ts
            elif kind == "sys_ioctl" and ret is not None and "copy" in have and "copied" not in have:
                cur["copied"] = ts
        elif tid == host:
            # On loopback the request reaches the host inside the handler's send call: a
            # busy-polling host may read it before that call returns.
            if kind in ("sys_recvfrom", "sys_read") and (ret or 0) > 0 and "send" in have and "srecv" not in have:
                cur["srecv"], cur["cpus"] = ts, (cur["cpus"][0], cur["cpus"][1], cpu)
            elif kind == "sys_sendto" and ret is None and "srecv" in have and "ssend" not in have:
                cur["ssend"] = ts
            elif kind == "sys_sendto" and ret is not None and "ssend" in have and "ssent" not in have:
                cur["ssent"] = ts
        # The program may run (on another CPU) before the ioctl's exit is logged.
        if kind == "sched_switch" and f"next_pid={app} " in rest and "copy" in have and "run" not in have:
            cur["run"] = ts
    if cur and "run" in cur:
        done.append(cur)
    return [f for f in done if all(s in f for s in STEPS)]


def summary(faults):
    """Median and trimmed mean (2.5% cut at each end; the trace's clock counts whole
    microseconds, the mean shows fractions) per step."""
    def stat(values):
        values = sorted(values)
        cut = len(values) // 40
        return statistics.median(values), statistics.mean(values[cut : len(values) - cut])

    out = {s: stat([f[s] - f[STEPS[i]] for f in faults]) for i, s in enumerate(STEPS[1:])}
    out["total"] = stat([f["run"] - f["fault"] for f in faults])
    return out


def main():
    args = sys.argv[1:]
    if not args or len(args) % 2:
        sys.exit(__doc__)
    columns = []
    for name, path in zip(args[::2], args[1::2]):
        faults = steps(*load(path))
        if not faults:
            sys.exit(f"{path}: no complete remote fault traced")
        cpus = Counter(f["cpus"] for f in faults).most_common(1)[0]
        columns.append((name, summary(faults), len(faults), cpus))
    print("Remote fault, step by step: median us (mean of the middle 95%), traced")
    print(f"{'step':<36}" + "".join(f"{name:>22}" for name, *_ in columns))
    for s in STEPS[1:] + ["total"]:
        label = LABELS.get(s, "fault -> program runs (total)")
        print(f"{label:<36}" + "".join(f"{c[1][s][0]:>12.1f} ({c[1][s][1]:5.1f})" for c in columns))
    print(f"{'remote faults traced':<36}" + "".join(f"{c[2]:>22}" for c in columns))
    placement = [f"{'/'.join(map(str, c[3][0]))} in {100 * c[3][1] // c[2]}%" for c in columns]
    print(f"{'CPUs of program/handler/host':<36}" + "".join(f"{p:>22}" for p in placement))


if __name__ == "__main__":
    main()
