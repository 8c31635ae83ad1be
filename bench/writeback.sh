#!/usr/bin/env bash
# The write-back and dirty-tracking figures of the README, in one run (root; ~10 minutes on
# 2 cores at the defaults), printed as a table of medians over REPS interleaved runs (the
# order of the modes rotates from one repetition to the next):
#   sparse-write, random, seq-write and quicksort at 25% local memory, each with
#   sync tracking + line write-back (the default), sync + page, and async + page;
#   then the cost per written page of each tracking mode: seq-write over a region that fits
#   in local memory (every op is a first store to a clean resident page), against plain memory.
# usage: sudo [SIZE=512M] [SORT_SIZE=128M] [REPS=3] bench/writeback.sh   (JSON=1: every run's JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE:-512M}
sort_size=${SORT_SIZE:-128M}
reps=${REPS:-3}
cargo build --release -q -p clustermem-cli -p clustermem-uffd --examples --bins
bin=target/release/clustermem
runs=$(mktemp)
trap 'rm -f "$runs"' EXIT
# run LABEL BENCH-ARGS...: one measurement, appended as "LABEL<TAB>JSON".
run() {
  local label=$1
  shift
  echo "running $label: clustermem bench $* --json" >&2
  printf '%s\t%s\n' "$label" "$($bin bench "$@" --json)" >>"$runs"
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
    print(f"| {workload} | {mode} | {statistics.median(us)} ({', '.join(map(str, us))}) | {sent / 1e6:.1f} MB "
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
