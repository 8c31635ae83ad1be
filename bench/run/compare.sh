#!/usr/bin/env bash
# Unmodified programs three ways, same local-memory budget, same run:
#   all-local   the program on its own, no limit (upper bound: everything in RAM)
#   linux-swap  inside a memory cgroup limited to LOCAL, with a swap file of SWAP bytes on
#               WORKDIR: the kernel pages the program out to disk and back
#   clustermem  `clustermem run --local-mem LOCAL -- PROGRAM`: its large memory in cluster
#               memory (the embedded host, loopback TCP), at most LOCAL of it resident
# Programs:
#   python      crates/cli/tests/programs/structures.py PY_N: lists, dicts and bytes several
#               times LOCAL, hashed; the three outputs must be identical
#   redis       redis-server (--save ''), redis-benchmark -t set,get -n REDIS_N -r REDIS_N
#               -d 256 (at the defaults redis ends with used_memory ~277 MiB, ~4x LOCAL, so
#               its requests page: with 200000 keys, the default until stop 20, the data
#               fitted in LOCAL and the rows measured an unpaged server), then redis_check.py
#               writes REDIS_KEYS keys of REDIS_VALUE bytes and reads every key back (its own
#               and redis-benchmark's), which must verify
# Prints a table (wall seconds or requests/s; swap/this > 1 means faster than Linux swap)
# and writes raw JSON lines to RESULTS. A redis mode that fails (Linux swap under the cgroup
# limit can have redis OOM-killed) shows "failed" and why; only a failed all-local or
# clustermem run makes the script exit non-zero. Like bench/swap/run.sh it needs root, a
# cgroup memory controller and a disk filesystem for the swap file.
#
# usage: bench/run/compare.sh [VAR=value ...]
#   LOCAL=64M  PY_N=2000000  REDIS_N=600000  REDIS_KEYS=100000  REDIS_VALUE=1024
#   SWAP=4G  WORKDIR=/var/tmp  CGROUP=auto|v2|v1  CLUSTERMEM=<repo>/target/release/clustermem
#   RESULTS=<repo>/bench/run/results-latest.jsonl  PYTHON=/usr/bin/python3
#   RUN_ARGS="--dirty-tracking async"  (more flags for `clustermem run`, split on spaces)
#   REDIS_CHECK_PHASES=1 (in the environment): the checker says each phase's time on stderr
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
die() { echo "runbench: ERROR: $*" >&2; exit 1; }
note() { echo "runbench: $*" >&2; }

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    LOCAL=*|PY_N=*|REDIS_N=*|REDIS_KEYS=*|REDIS_VALUE=*|SWAP=*|WORKDIR=*|CGROUP=*|CLUSTERMEM=*|RESULTS=*|PYTHON=*|RUN_ARGS=*)
      export "${arg?}" ;;
    *) die "unknown argument '$arg' (expected VAR=value; see --help)" ;;
  esac
done
LOCAL=${LOCAL:-64M}
PY_N=${PY_N:-2000000}
REDIS_N=${REDIS_N:-600000}
REDIS_KEYS=${REDIS_KEYS:-100000}
REDIS_VALUE=${REDIS_VALUE:-1024}
SWAP=${SWAP:-4G}
WORKDIR=${WORKDIR:-/var/tmp}
CGROUP=${CGROUP:-auto}
CLUSTERMEM=${CLUSTERMEM:-$repo/target/release/clustermem}
RESULTS=${RESULTS:-$here/results-latest.jsonl}
PYTHON=${PYTHON:-/usr/bin/python3}
read -r -a run_args <<<"${RUN_ARGS:-}"
programs=$repo/crates/cli/tests/programs

[ -x "$CLUSTERMEM" ] || die "no clustermem at $CLUSTERMEM (cargo build --release builds it and its preload library)"
for t in "$PYTHON" redis-server redis-benchmark redis-cli; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install python3 redis-server redis-tools)"
done
bytes() { numfmt --from=iec "$1" 2>/dev/null || die "cannot parse size $1 (e.g. 64M, 4G)"; }
local_b=$(bytes "$LOCAL")
swap_b=$(bytes "$SWAP")

# shellcheck source=../lib/swap-cgroup.sh
. "$here/../lib/swap-cgroup.sh"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }
: > "$RESULTS"
record() { # record JSON: one line to RESULTS
  echo "$1" >> "$RESULTS"
}

# ---- python --------------------------------------------------------------------------------
declare -A py_out
for mode in all-local linux-swap clustermem; do
  note "python structures.py $PY_N: $mode"
  cmd=("$PYTHON" "$programs/structures.py" "$PY_N")
  t0=$(now)
  case $mode in
    all-local) "${cmd[@]}" > "$tmpdir/py.out" 2> "$tmpdir/py.err" ;;
    linux-swap) in_cgroup "${cmd[@]}" > "$tmpdir/py.out" 2> "$tmpdir/py.err" ;;
    clustermem) "$CLUSTERMEM" run --local-mem "$local_b" "${run_args[@]}" --stats-json "$tmpdir/py.stats" -- "${cmd[@]}" \
                  > "$tmpdir/py.out" 2> "$tmpdir/py.err" ;;
  esac || { cat "$tmpdir/py.err" >&2; die "python $mode failed"; }
  t1=$(now)
  py_out[$mode]=$(cat "$tmpdir/py.out")
  rss=$(awk '/^maxrss_kb/ {print $2}' "$tmpdir/py.err")
  record "{\"program\": \"python\", \"mode\": \"$mode\", \"wall_s\": $(elapsed "$t0" "$t1"), \"maxrss_kb\": $rss, \"output\": \"${py_out[$mode]}\"}"
done
[ "${py_out[all-local]}" = "${py_out[linux-swap]}" ] && [ "${py_out[all-local]}" = "${py_out[clustermem]}" ] \
  || die "python outputs differ: ${py_out[*]}"

# ---- redis ---------------------------------------------------------------------------------
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# redis_failed MODE WHAT: the mode's redis row records why it has no figures (the server
# killed by its memory cgroup's OOM killer, or what failed), and the run goes on, so the
# table still shows the other modes.
redis_failed() {
  local why=$2 status=0
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" || status=$?
    if [ "$1" = linux-swap ] && [ "$(cg_oom_kills)" -gt "$oom_before" ]; then
      why="$why: redis-server was killed by its memory cgroup's OOM killer (the kernel could not reclaim fast enough)"
    else
      why="$why: redis-server exited with status $status"
    fi
  else
    redis-cli -p "$port" shutdown nosave > /dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  note "redis $1: $why"
  record "{\"program\": \"redis\", \"mode\": \"$1\", \"failed\": \"$why\"}"
}
for mode in all-local linux-swap clustermem; do
  port=$(free_port)
  server=(redis-server --port "$port" --save "" --appendonly no --loglevel warning)
  note "redis: $mode (port $port)"
  oom_before=$(cg_oom_kills)
  case $mode in
    all-local) "${server[@]}" > "$tmpdir/redis.log" 2>&1 & ;;
    linux-swap) in_cgroup "${server[@]}" > "$tmpdir/redis.log" 2>&1 & ;;
    clustermem) "$CLUSTERMEM" run --local-mem "$local_b" "${run_args[@]}" -- "${server[@]}" > "$tmpdir/redis.log" 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 1 100); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  redis-cli -p "$port" ping 2>/dev/null | grep -q PONG || { cat "$tmpdir/redis.log" >&2; die "redis $mode did not start"; }
  if ! redis-benchmark -p "$port" -t set,get -n "$REDIS_N" -r "$REDIS_N" -d 256 --csv > "$tmpdir/bench.csv" 2>/dev/null; then
    redis_failed "$mode" "redis-benchmark failed"
    continue
  fi
  set_rps=$(awk -F'","' '/^"SET"/ {print $2}' "$tmpdir/bench.csv")
  get_rps=$(awk -F'","' '/^"GET"/ {print $2}' "$tmpdir/bench.csv")
  t0=$(now)
  if ! "$PYTHON" "$programs/redis_check.py" "$port" "$REDIS_KEYS" "$REDIS_VALUE" 256 > "$tmpdir/check.out" 2> "$tmpdir/check.err"; then
    tail -1 "$tmpdir/check.err" >&2
    redis_failed "$mode" "the load+verify pass failed"
    continue
  fi
  t1=$(now)
  used=$(redis-cli -p "$port" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
  redis-cli -p "$port" shutdown nosave > /dev/null 2>&1 || true
  if ! wait "$pid"; then
    redis_failed "$mode" "redis-server did not exit cleanly"
    continue
  fi
  record "{\"program\": \"redis\", \"mode\": \"$mode\", \"set_rps\": $set_rps, \"get_rps\": $get_rps, \"check_s\": $(elapsed "$t0" "$t1"), \"used_memory\": $used, \"verified\": \"$(cat "$tmpdir/check.out")\"}"
done

# ---- table ---------------------------------------------------------------------------------
"$PYTHON" - "$RESULTS" "$local_b" "$cgver" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
local, cgver = int(sys.argv[2]), sys.argv[3]
by = {(r["program"], r["mode"]): r for r in rows}
modes = ("all-local", "linux-swap", "clustermem")
print(f"\nlocal budget {local >> 20} MiB (linux-swap: memory cgroup {cgver} limit; clustermem: --local-mem)")
print(f"{'row':<34} {'all-local':>11} {'linux-swap':>11} {'clustermem':>11} {'swap/this':>10}")
def row(name, key, higher_better, fmt):
    # A mode whose run failed has no figure: its cell says so, and the ratio is left out.
    a, s, c = (by[(name.split()[0], m)].get(key) for m in modes)
    cell = lambda v: "failed" if v is None else fmt(v)
    ratio = "-" if s is None or c is None else f"{(c / s) if higher_better else (s / c):.2f}x"
    print(f"{name:<34} {cell(a):>11} {cell(s):>11} {cell(c):>11} {ratio:>10}")
row("python structures (wall s)", "wall_s", False, lambda v: f"{v:.2f}")
row("redis SET (requests/s)", "set_rps", True, lambda v: f"{v:.0f}")
row("redis GET (requests/s)", "get_rps", True, lambda v: f"{v:.0f}")
row("redis load+verify all keys (s)", "check_s", False, lambda v: f"{v:.2f}")
print(f"python peak RSS KiB: " + ", ".join(f"{m} {by[('python', m)]['maxrss_kb']}" for m in modes))
for m in modes:
    if "failed" in by[("redis", m)]:
        print(f"redis {m} failed: {by[('redis', m)]['failed']}")
used = [by[("redis", m)]["used_memory"] for m in modes if "used_memory" in by[("redis", m)]]
if used:
    print(f"redis used_memory: {used[0] >> 20} MiB; swap/this > 1: clustermem is faster than Linux swap")
print(f"raw JSON: {sys.argv[1]}")
# Only the baseline may fail (Linux swap under a cgroup limit can OOM-kill redis): a failed
# all-local or clustermem run fails the script.
sys.exit(1 if any("failed" in by[("redis", m)] for m in ("all-local", "clustermem")) else 0)
PY
