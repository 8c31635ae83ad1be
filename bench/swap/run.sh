#!/usr/bin/env bash
# clustermem vs Linux swap, same workload, same local-memory budget, same run.
#
# For each workload it runs `clustermem bench WORKLOAD --json` four ways:
#   all-local      --backend local, no memory limit (upper bound: everything in RAM)
#   linux-swap     --backend local inside a memory cgroup limited to LOCAL bytes, with a swap
#                  file of 2*SIZE on WORKDIR: the kernel pages the region out to disk and back
#   clustermem     --local-mem LOCAL (default mode; clustermem bounds its own memory, no cgroup)
#   clustermem-ll  --local-mem LOCAL --low-latency (busy-polls while faults are outstanding)
# plus /work/shared/floor/run once at the start (remote-fault floor of this machine). It checks
# `verified` in every result, prints a table (wall_s, us/op, linux-swap/clustermem ratio where
# >1 means clustermem is faster, clustermem fault p50 against the floor, pswpin/pswpout deltas
# of the swap runs) and writes every raw JSON line to RESULTS.
#
# usage (root; needs a cgroup memory controller and a filesystem that supports swap files):
#   sudo bench/swap/run.sh [VAR=value ...]        or the same VARs in the environment
#   e.g. sudo bench/swap/run.sh SIZE=256M LOCAL=25% WORKLOADS="random quicksort"
# vars:
#   SIZE=2G                 region size (K/M/G/T, KiB/MiB/GiB/TiB suffixes, or bytes)
#   LOCAL=25%               local memory: a percentage of SIZE or a size (e.g. 512M)
#   WORKLOADS="random zipf quicksort seq-read"
#   CLUSTERMEM=<repo>/target/release/clustermem
#   WORKDIR=/var/tmp        where the temporary swap file goes (must be a real disk filesystem)
#   RESULTS=<repo>/bench/swap/results-latest.jsonl   (git-ignored)
#   FLOOR=/work/shared/floor/run
#   SWAP_RETRIES=3          re-runs of a linux-swap run that the cgroup OOM-kills (seen with the
#                           v1 memory controller even with free swap); counted in the results
#   CGROUP=auto|v2|v1       memory controller to use. auto: cgroup v2 if its memory controller
#                           is available, else (hybrid hierarchy, memory bound to v1) the v1
#                           memory controller with a loud note; v2 fails if v2 is unavailable.
# Cleanup (trap on EXIT, also on failure and ctrl-c): kills what is left in the benchmark
# cgroup, removes the cgroup, swapoff + rm of the swap file this script added. Swap that was
# on before is left alone (and the kernel may also use it for the linux-swap runs).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

die() { echo "swapbench: ERROR: $*" >&2; exit 1; }
note() { echo "swapbench: $*" >&2; }

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    SIZE=*|LOCAL=*|WORKLOADS=*|CLUSTERMEM=*|WORKDIR=*|RESULTS=*|FLOOR=*|CGROUP=*|SWAP_RETRIES=*)
      export "${arg?}" ;;
    *) die "unknown argument '$arg' (expected VAR=value; see --help)" ;;
  esac
done

SIZE=${SIZE:-2G}
LOCAL=${LOCAL:-25%}
WORKLOADS=${WORKLOADS:-random zipf quicksort seq-read}
CLUSTERMEM=${CLUSTERMEM:-$repo/target/release/clustermem}
WORKDIR=${WORKDIR:-/var/tmp}
RESULTS=${RESULTS:-$here/results-latest.jsonl}
FLOOR=${FLOOR:-/work/shared/floor/run}
CGROUP=${CGROUP:-auto}
SWAP_RETRIES=${SWAP_RETRIES:-3}

[ "$(id -u)" -eq 0 ] || die "must run as root (swapon, mkswap and cgroup setup need it): sudo $0 $*"
command -v python3 >/dev/null || die "python3 is required (JSON parsing and the table)"
for t in mkswap swapon swapoff; do command -v "$t" >/dev/null || die "$t not found"; done
[ -x "$CLUSTERMEM" ] || die "clustermem binary not found at $CLUSTERMEM (build: cargo build --release -p clustermem-cli, or set CLUSTERMEM=)"
[ -x "$FLOOR" ] || die "floor program not found at $FLOOR (set FLOOR=)"

# ---- sizes ---------------------------------------------------------------------------------
to_bytes() { # to_bytes SIZE [TOTAL]: a size, or a percentage of TOTAL; page-aligned down
  python3 - "$1" "${2:-}" <<'PY'
import re, sys
s, total = sys.argv[1].strip(), sys.argv[2]
m = re.fullmatch(r'([0-9]+(?:\.[0-9]+)?)\s*%', s)
if m:
    if not total:
        sys.exit(f"a percentage ({s}) needs a total")
    b = int(int(total) * float(m.group(1)) / 100)
else:
    m = re.fullmatch(r'([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?[bB])?', s)
    if not m:
        sys.exit(f"cannot parse size '{s}' (use e.g. 512M, 2G, 1GiB, 25%, or bytes)")
    b = int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
b -= b % 4096
if b <= 0:
    sys.exit(f"size '{s}' is smaller than a page")
print(b)
PY
}
size_b=$(to_bytes "$SIZE") || die "bad SIZE=$SIZE"
local_b=$(to_bytes "$LOCAL" "$size_b") || die "bad LOCAL=$LOCAL"
[ "$local_b" -lt "$size_b" ] || die "LOCAL ($local_b bytes) must be below SIZE ($size_b bytes), or nothing is paged"
swap_b=$((2 * size_b))
for w in $WORKLOADS; do
  case "$w" in seq-read|seq-write|random|zipf|quicksort) ;; *) die "unknown workload '$w'" ;; esac
done

# ---- cgroup memory controller --------------------------------------------------------------
fstype() { stat -f -c %T "$1" 2>/dev/null || echo none; }
v2root=""
if [ "$(fstype /sys/fs/cgroup)" = cgroup2fs ]; then v2root=/sys/fs/cgroup
elif [ -d /sys/fs/cgroup/unified ] && [ "$(fstype /sys/fs/cgroup/unified)" = cgroup2fs ]; then v2root=/sys/fs/cgroup/unified
fi
v2_ok=false
if [ -n "$v2root" ] && grep -qw memory "$v2root/cgroup.controllers" 2>/dev/null; then v2_ok=true; fi
v1root=/sys/fs/cgroup/memory
v1_ok=false
if [ "$(fstype $v1root)" = cgroupfs ] && [ -f $v1root/memory.limit_in_bytes ]; then v1_ok=true; fi

case "$CGROUP" in
  v2|auto)
    if $v2_ok; then cgver=v2
    elif [ "$CGROUP" = auto ] && $v1_ok; then
      cgver=v1
      note "NOTE: the cgroup v2 memory controller is unavailable (${v2root:-no cgroup2 mount}; hybrid hierarchy,"
      note "      memory is bound to cgroup v1 at $v1root). Using the v1 memory controller:"
      note "      memory.limit_in_bytes=LOCAL, memory.memsw.limit_in_bytes=-1 (swap unlimited)."
    else
      die "cgroup v2 memory controller unavailable (cgroup2 mount: ${v2root:-none}; controllers: $(cat "${v2root:-/nonexistent}/cgroup.controllers" 2>/dev/null || echo n/a))"
    fi ;;
  v1) $v1_ok || die "cgroup v1 memory controller not mounted at $v1root"; cgver=v1 ;;
  *) die "CGROUP must be auto, v2 or v1" ;;
esac

# ---- cleanup (installed before anything is created) ----------------------------------------
swapfile=""
swap_added=false
cg=""
enabled_subtree=false
cleanup() {
  local rc=$?
  set +e
  if [ -n "$cg" ] && [ -d "$cg" ]; then
    # Anything still in the cgroup was started by this script (e.g. after ctrl-c).
    local pids pid i
    for i in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(cat "$cg/cgroup.procs" 2>/dev/null)
      [ -z "$pids" ] && break
      for pid in $pids; do kill -KILL "$pid" 2>/dev/null; done
      sleep 0.2
    done
    for i in 1 2 3 4 5 6 7 8 9 10; do rmdir "$cg" 2>/dev/null && break; sleep 0.3; done
    [ -d "$cg" ] && echo "swapbench: WARNING: could not remove cgroup $cg" >&2
  fi
  if $enabled_subtree; then echo -memory > "$v2root/cgroup.subtree_control" 2>/dev/null; fi
  if $swap_added; then
    swapoff "$swapfile" || echo "swapbench: WARNING: swapoff $swapfile failed" >&2
  fi
  if [ -n "$swapfile" ] && ! grep -q "^$swapfile " /proc/swaps; then rm -f "$swapfile"; fi
  [ -n "${tmpdir:-}" ] && rm -rf "$tmpdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tmpdir=$(mktemp -d)

# ---- swap file -----------------------------------------------------------------------------
mkdir -p "$WORKDIR"
wd_fs=$(findmnt -no FSTYPE -T "$WORKDIR" 2>/dev/null || fstype "$WORKDIR")
case "$wd_fs" in
  tmpfs|ramfs|overlayfs|overlay|nfs|fuse*|squashfs|cgroup*|proc|sysfs)
    die "WORKDIR=$WORKDIR is on $wd_fs, which cannot hold a swap file; set WORKDIR to a directory on a disk filesystem (ext4, xfs, btrfs)" ;;
esac
avail_b=$(( $(df -Pk "$WORKDIR" | awk 'NR==2 {print $4}') * 1024 ))
[ "$avail_b" -gt $((swap_b + 256 * 1024 * 1024)) ] || die "WORKDIR=$WORKDIR has $((avail_b >> 20)) MiB free; the swap file needs $((swap_b >> 20)) MiB"

swap_before=$(awk 'NR>1' /proc/swaps)
if [ -n "$swap_before" ]; then
  note "swap already on before this run (left alone; the kernel may use it too):"
  echo "$swap_before" >&2
fi
swapfile="$WORKDIR/clustermem-swapbench-$$.swap"
note "creating $((swap_b >> 20)) MiB swap file $swapfile ($wd_fs)"
rm -f "$swapfile"
( umask 077; : > "$swapfile" )
# btrfs needs NOCOW for swap files; harmless elsewhere.
[ "$wd_fs" = btrfs ] && chattr +C "$swapfile" 2>/dev/null || true
if ! fallocate -l "$swap_b" "$swapfile" 2>/dev/null; then
  note "fallocate failed; writing zeros with dd"
  dd if=/dev/zero of="$swapfile" bs=1M count=$((swap_b >> 20)) status=none conv=fsync
fi
chmod 600 "$swapfile"
mkswap "$swapfile" >/dev/null || die "mkswap $swapfile failed"
if ! swapon -p 32767 "$swapfile" 2>"$tmpdir/swapon.err"; then
  note "swapon with the fallocated file failed ($(cat "$tmpdir/swapon.err")); retrying with a dd-written file"
  rm -f "$swapfile"; ( umask 077; : > "$swapfile" )
  [ "$wd_fs" = btrfs ] && chattr +C "$swapfile" 2>/dev/null || true
  dd if=/dev/zero of="$swapfile" bs=1M count=$((swap_b >> 20)) status=none conv=fsync
  mkswap "$swapfile" >/dev/null || die "mkswap $swapfile failed"
  swapon -p 32767 "$swapfile" 2>"$tmpdir/swapon.err" \
    || die "swapon $swapfile failed on $wd_fs: $(cat "$tmpdir/swapon.err") -- set WORKDIR to a filesystem that supports swap files"
fi
swap_added=true
grep -q "^$swapfile " /proc/swaps || die "swapon reported success but $swapfile is not in /proc/swaps"

# ---- cgroup --------------------------------------------------------------------------------
if [ "$cgver" = v2 ]; then
  cg="$v2root/clustermem-swapbench-$$"
  if ! grep -qw memory "$v2root/cgroup.subtree_control"; then
    echo +memory > "$v2root/cgroup.subtree_control" || die "cannot enable the memory controller in $v2root/cgroup.subtree_control"
    enabled_subtree=true
  fi
  mkdir "$cg"
  [ -f "$cg/memory.max" ] || die "$cg has no memory.max (memory controller not enabled for it)"
  echo "$local_b" > "$cg/memory.max"
  if [ -f "$cg/memory.swap.max" ]; then echo max > "$cg/memory.swap.max"
  else note "WARNING: $cg has no memory.swap.max (swap accounting off?); swap is not limited"; fi
  [ "$(cat "$cg/memory.max")" = "$local_b" ] || die "memory.max did not take: $(cat "$cg/memory.max")"
else
  cg="$v1root/clustermem-swapbench-$$"
  mkdir "$cg"
  [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo -1 > "$cg/memory.memsw.limit_in_bytes"
  echo "$local_b" > "$cg/memory.limit_in_bytes"
  [ "$(cat "$cg/memory.limit_in_bytes")" = "$local_b" ] || die "memory.limit_in_bytes did not take: $(cat "$cg/memory.limit_in_bytes")"
fi
cg_swappiness=$(cat "$cg/memory.swappiness" 2>/dev/null || cat /proc/sys/vm/swappiness)
note "cgroup $cgver $cg: limit $local_b bytes, swappiness $cg_swappiness"

cg_peak() {
  if [ "$cgver" = v2 ]; then cat "$cg/memory.peak" 2>/dev/null || echo null
  else cat "$cg/memory.max_usage_in_bytes"; fi
}
cg_reset_peak() { # v1 only; v2's memory.peak is the cgroup's lifetime maximum
  [ "$cgver" = v1 ] && echo 0 > "$cg/memory.max_usage_in_bytes" || true
}
cg_oom_kills() {
  if [ "$cgver" = v2 ]; then awk '$1 == "oom_kill" {print $2}' "$cg/memory.events"
  else awk '$1 == "oom_kill" {print $2}' "$cg/memory.oom_control"; fi
}
vmstat() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }

# ---- runs ----------------------------------------------------------------------------------
: > "$RESULTS"
# record FILE MODE [extra json fields as k=v]: add mode/extras to the JSON in FILE, check
# `verified`, append one line to RESULTS.
record() {
  python3 - "$@" <<'PY' >> "$RESULTS"
import json, sys
path, mode, extras = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path).read().strip()
try:
    obj = json.loads(text.splitlines()[-1])
except Exception as e:
    sys.exit(f"swapbench: ERROR: {mode}: no JSON object in output ({e}): {text[:500]!r}")
obj = {"mode": mode, **obj}
for kv in extras:
    k, v = kv.split("=", 1)
    try:
        obj[k] = json.loads(v)
    except ValueError:
        obj[k] = v
if mode != "floor" and obj.get("verified") is not True:
    sys.exit(f"swapbench: ERROR: {mode} {obj.get('workload')}: verified={obj.get('verified')!r} "
             f"verify_error={obj.get('verify_error')!r}")
print(json.dumps(obj))
PY
}

run_bench() { # run_bench MODE WORKLOAD [extra clustermem args...]; output in $tmpdir/out
  local mode=$1 w=$2; shift 2
  note "$w: $mode"
  if ! "$CLUSTERMEM" bench "$w" --size "$size_b" --json "$@" > "$tmpdir/out" 2> "$tmpdir/err"; then
    tail -n 20 "$tmpdir/err" >&2
    die "$w $mode: clustermem bench failed"
  fi
}

note "floor: $FLOOR"
"$FLOOR" > "$tmpdir/out" || die "$FLOOR failed"
record "$tmpdir/out" floor

python3 - <<PY >> "$RESULTS"
import json
print(json.dumps({"mode": "config", "size_bytes": $size_b, "local_mem_bytes": $local_b,
  "swap_file_bytes": $swap_b, "swap_file": "$swapfile", "workdir_fs": "$wd_fs",
  "cgroup": "$cg", "cgroup_version": "$cgver", "cgroup_swappiness": "$cg_swappiness",
  "swap_before": $(printf '%s' "$swap_before" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'),
  "kernel": "$(uname -r)", "nproc": $(nproc), "workloads": "$WORKLOADS"}))
PY

for w in $WORKLOADS; do
  run_bench all-local "$w" --backend local
  record "$tmpdir/out" all-local

  oom_kills=0
  for attempt in $(seq 1 $((SWAP_RETRIES + 1))); do
    cg_reset_peak
    oom0=$(cg_oom_kills)
    in0=$(vmstat pswpin); out0=$(vmstat pswpout)
    note "$w: linux-swap (in $cg), attempt $attempt"
    if CG_PROCS="$cg/cgroup.procs" bash -c 'echo $$ > "$CG_PROCS"; exec "$@"' _ \
        "$CLUSTERMEM" bench "$w" --size "$size_b" --backend local --json > "$tmpdir/out" 2> "$tmpdir/err"; then
      break
    fi
    if [ "$(cg_oom_kills)" -gt "$oom0" ]; then
      oom_kills=$((oom_kills + 1))
      note "WARNING: $w linux-swap: OOM-killed by the cgroup memory controller although swap is free ($oom_kills so far)"
      [ "$attempt" -le "$SWAP_RETRIES" ] && continue
      die "$w linux-swap: OOM-killed $oom_kills times in the cgroup (SWAP_RETRIES=$SWAP_RETRIES)"
    fi
    tail -n 20 "$tmpdir/err" >&2
    die "$w linux-swap: clustermem bench --backend local failed in the cgroup"
  done
  in1=$(vmstat pswpin); out1=$(vmstat pswpout)
  record "$tmpdir/out" linux-swap pswpin=$((in1 - in0)) pswpout=$((out1 - out0)) \
    cgroup_limit_bytes="$local_b" cgroup_peak_bytes="$(cg_peak)" oom_killed_attempts="$oom_kills"

  run_bench clustermem "$w" --local-mem "$local_b"
  record "$tmpdir/out" clustermem
  run_bench clustermem-ll "$w" --local-mem "$local_b" --low-latency
  record "$tmpdir/out" clustermem-ll
done

# ---- table ---------------------------------------------------------------------------------
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
floor = next(r for r in rows if r["mode"] == "floor")
cfg = next(r for r in rows if r["mode"] == "config")
MiB = 1 << 20
print(f"\nSIZE {cfg['size_bytes'] // MiB} MiB, LOCAL {cfg['local_mem_bytes'] // MiB} MiB, "
      f"swap file {cfg['swap_file_bytes'] // MiB} MiB on {cfg['workdir_fs']}, "
      f"cgroup {cfg['cgroup_version']} (swappiness {cfg['cgroup_swappiness']}), kernel {cfg['kernel']}")
print(f"floor: remote_fault_p50 {floor['remote_fault_p50_us']} us, "
      f"remote_fault_spin_p50 {floor['remote_fault_spin_p50_us']} us, "
      f"tcp {floor['tcp_stream_gb_s']} GB/s, memcpy {floor['memcpy_gb_s']} GB/s")
hdr = (f"{'workload':<10} {'mode':<14} {'setup_s':>8} {'wall_s':>9} {'us/op':>9} "
       f"{'swap/this':>9} {'fault_p50':>9} {'p50/floor':>9} {'fault_p99':>9} {'pswpin':>8} {'pswpout':>8} {'peak_MiB':>8}")
print(hdr); print("-" * len(hdr))
warn = []
for w in dict.fromkeys(r["workload"] for r in rows if "workload" in r):
    by = {r["mode"]: r for r in rows if r.get("workload") == w}
    swap = by.get("linux-swap")
    for mode in ("all-local", "linux-swap", "clustermem", "clustermem-ll"):
        r = by.get(mode)
        if not r:
            continue
        ratio = f"{swap['wall_s'] / r['wall_s']:.2f}" if swap and r["wall_s"] > 0 else "-"
        p50 = p50f = p99 = pin = pout = peak = "-"
        if mode.startswith("clustermem"):
            f = floor["remote_fault_spin_p50_us" if mode == "clustermem-ll" else "remote_fault_p50_us"]
            p50, p99 = f"{r['fault_p50_us']:.1f}", f"{r['fault_p99_us']:.1f}"
            p50f = f"{r['fault_p50_us'] / f:.2f}" if f else "-"
        if mode == "linux-swap":
            pin, pout = str(r["pswpin"]), str(r["pswpout"])
            peak = f"{r['cgroup_peak_bytes'] / MiB:.0f}" if isinstance(r.get("cgroup_peak_bytes"), int) else "-"
            if r.get("oom_killed_attempts"):
                warn.append(f"{w}: linux-swap was OOM-killed {r['oom_killed_attempts']} time(s) by the cgroup before this run succeeded")
            if r["pswpout"] == 0 or r["pswpin"] == 0:
                warn.append(f"{w}: linux-swap run shows pswpin={r['pswpin']} pswpout={r['pswpout']}: swap was NOT really used")
            if isinstance(r.get("cgroup_peak_bytes"), int) and r["cgroup_peak_bytes"] > r["cgroup_limit_bytes"]:
                warn.append(f"{w}: cgroup peak {r['cgroup_peak_bytes']} > limit {r['cgroup_limit_bytes']}: limit did not apply")
        print(f"{w:<10} {mode:<14} {r['setup_s']:>8.3f} {r['wall_s']:>9.4f} {r['us_per_op']:>9.3f} "
              f"{ratio:>9} {p50:>9} {p50f:>9} {p99:>9} {pin:>8} {pout:>8} {peak:>8}")
print("swap/this = linux-swap wall_s / this wall_s (>1: this is faster than Linux swap). "
      "p50/floor: clustermem vs remote_fault_p50, clustermem-ll vs remote_fault_spin_p50.\n"
      "pswpin/pswpout: /proc/vmstat page deltas over the linux-swap run (system-wide); "
      "peak_MiB: cgroup memory peak" + (" (v2: lifetime max of the cgroup)" if cfg["cgroup_version"] == "v2" else "") + ".")
for m in warn:
    print("WARNING:", m)
print(f"raw JSON: {sys.argv[1]}")
PY
