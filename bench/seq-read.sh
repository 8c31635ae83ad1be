#!/usr/bin/env bash
# The prefetching issue's headline figure: `seq-read --size 2G --local-mem 25%` throughput
# against the floor's loopback TCP stream, each run right after a floor measurement (the
# floor moves between runs on a shared VM). Root; ~15 s a run on 2 cores.
# usage: sudo [RUNS=3] [SIZE=2G] bench/seq-read.sh [extra bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
size=${SIZE:-2G}
cargo build --release -q -p clustermem-cli
bin=target/release/clustermem
printf '%-4s %10s %10s %8s %8s %10s\n' run "GB/s" "floor GB/s" ratio faults "p50 us"
for i in $(seq 1 "$runs"); do
  floor=$(../shared/floor/run)
  json=$($bin bench seq-read --size "$size" --local-mem 25% --json "$@")
  python3 - "$i" "$floor" "$json" <<'PY'
import json, sys
run, floor, d = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
assert d["verified"], d
gbs = d["size_bytes"] / d["wall_s"] / 1e9
tcp = floor["tcp_stream_gb_s"]
print(f"{run:<4} {gbs:10.2f} {tcp:10.2f} {gbs / tcp:7.0%} {d['faults']:8d} {d['fault_p50_us']:10.0f}")
PY
done
