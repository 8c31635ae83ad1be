#!/usr/bin/env bash
# The write-back and dirty-tracking figures of the README, in one run (root; ~10 minutes on
# 2 cores at the defaults), printed as a table of medians over REPS interleaved runs (the
# order of the modes rotates from one repetition to the next):
#   sparse-write, random, seq-write and quicksort at 25% local memory, each with
#   sync tracking + line write-back (the default), sync + page, and async + page;
#   then the cost per written page of each tracking mode: seq-write over a region that fits
#   in local memory (every op is a first store to a clean resident page), against plain memory.
# usage: sudo [SIZE=512M] [SORT_SIZE=128M] [REPS=3] [LINK=1gbit] bench/writeback.sh
#   JSON=1 also prints every run's JSON line.
#   LINK=RATE puts the memory host in a network namespace of its own, behind a veth pair
#   shaped to RATE each way (tc tbf, e.g. 1gbit, 10gbit): a network where bytes cost time,
#   unlike loopback. Without LINK the embedded host is used (loopback TCP).
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE:-512M}
sort_size=${SORT_SIZE:-128M}
reps=${REPS:-3}
cargo build --release -q -p clustermem-cli -p clustermem-uffd --examples --bins
bin=target/release/clustermem
runs=$(mktemp)
ns=cm-writeback
cleanup() {
  rm -f "$runs"
  if [ -n "${LINK:-}" ]; then
    ip netns pids $ns 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
    ip link del cmwb0 2>/dev/null || true
  fi
}
trap cleanup EXIT
hosts=()
if [ -n "${LINK:-}" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "LINK needs root (ip netns, tc)" >&2; exit 1; }
  ip netns add $ns
  ip link add cmwb0 type veth peer name cmwb1
  ip link set cmwb1 netns $ns
  ip addr add 10.77.0.1/24 dev cmwb0
  ip link set cmwb0 up
  ip netns exec $ns ip addr add 10.77.0.2/24 dev cmwb1
  ip netns exec $ns ip link set cmwb1 up
  tc qdisc add dev cmwb0 root tbf rate "$LINK" burst 256kb latency 5ms
  ip netns exec $ns tc qdisc add dev cmwb1 root tbf rate "$LINK" burst 256kb latency 5ms
  ip netns exec $ns "$bin" host --listen 10.77.0.2:7070 --capacity 8G >/dev/null 2>&1 &
  for _ in $(seq 50); do "$bin" status --hosts 10.77.0.2:7070 >/dev/null 2>&1 && break; sleep 0.1; done
  "$bin" status --hosts 10.77.0.2:7070 >/dev/null || { echo "the memory host in $ns did not start" >&2; exit 1; }
  hosts=(--hosts 10.77.0.2:7070)
  echo "memory host behind a $LINK veth link (namespace $ns)" >&2
fi
# run LABEL BENCH-ARGS...: one measurement, appended as "LABEL<TAB>JSON".
run() {
  local label=$1
  shift
  echo "running $label: clustermem bench $* --json" >&2
  printf '%s\t%s\n' "$label" "$($bin bench "$@" "${hosts[@]}" --json)" >>"$runs"
}
modes=("sync line" "sync page" "async page")
for ((rep = 0; rep < reps; rep++)); do
  for workload in sparse-write random seq-write quicksort; do
    s=$size
    [ $workload = quicksort ] && s=$sort_size
    # The order rotates each repetition: a run's position in the sequence moves it too.
    for ((m = 0; m < ${#modes[@]}; m++)); do
      set -- ${modes[(m + rep) % ${#modes[@]}]}
      run "$workload|$1 $2" $workload --size "$s" --local-mem 25% --dirty-tracking "$1" --writeback "$2"
    done
  done
  # First stores to resident clean pages: local memory above the region, no periodic flush.
  for t in sync async; do
    run "first-write|$t page" seq-write --size 256M --local-mem 600M --flush-interval-ms 0 \
      --dirty-tracking $t --writeback page
  done
  run "first-write|plain memory" seq-write --size 256M --backend local
done
python3 - "$runs" "${JSON:-0}" "$(target/release/examples/tracking_cost 65536)" <<'EOF'
import json, statistics, sys
from collections import defaultdict

runs = [line.rstrip("\n").split("\t", 1) for line in open(sys.argv[1])]
by = defaultdict(list)
for label, text in runs:
    by[label].append(json.loads(text))
med = lambda rs, f: statistics.median(f(r) for r in rs)
print("| workload | tracking + write-back | us/op (median, all runs) | bytes written back | "
      "page-granular bytes | less | lines per page written | write faults | tracking s |")
print("|---|---|---|---|---|---|---|---|---|")
for label, rs in by.items():
    workload, mode = label.split("|")
    if workload == "first-write":
        continue
    us = sorted(round(r["us_per_op"], 2) for r in rs)
    sent = med(rs, lambda r: r["bytes_written_back"])
    page = med(rs, lambda r: r["page_granular_bytes"])
    lines = med(rs, lambda r: r["dirty_lines_written"] / max(r["dirty_pages_written"], 1))
    print(f"| {workload} | {mode} | {round(statistics.median(us), 2)} ({', '.join(map(str, us))}) | {sent / 1e6:.1f} MB "
          f"| {page / 1e6:.1f} MB | {page / max(sent, 1):.1f}x | {lines:.1f} "
          f"| {med(rs, lambda r: r['write_faults']):.0f} | {med(rs, lambda r: r['tracking_s']):.2f} |")
print()
print("cost per written page (seq-write over 256 MiB, all resident and clean; plain memory pays only the stores):")
plain = med(by["first-write|plain memory"], lambda r: r["us_per_op"])
for label in ("first-write|sync page", "first-write|async page", "first-write|plain memory"):
    us = med(by[label], lambda r: r["us_per_op"])
    print(f"  {label.split('|')[1]:14s} {us:6.2f} us per page ({us - plain:+.2f} over plain memory)")
print("tracking_cost example (the mechanism alone):", sys.argv[3])
if sys.argv[2] == "1":
    for label, text in runs:
        print(label, text)
bad = [label for label, text in runs if not json.loads(text)["verified"]]
if bad:
    sys.exit(f"NOT VERIFIED: {', '.join(bad)}")
EOF
