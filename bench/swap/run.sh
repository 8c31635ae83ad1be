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

command -v python3 >/dev/null || die "python3 is required (JSON parsing and the table)"
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

# ---- swap file and cgroup ------------------------------------------------------------------
# shellcheck source=../lib/swap-cgroup.sh
. "$here/../lib/swap-cgroup.sh"

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
    if in_cgroup "$CLUSTERMEM" bench "$w" --size "$size_b" --backend local --json > "$tmpdir/out" 2> "$tmpdir/err"; then
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
