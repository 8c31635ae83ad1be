#!/usr/bin/env bash
# The prefetching figures of the README, in one run (root; ~7 minutes on 2 cores at the
# defaults), printed as a table, with the floor measured in the same run:
#   seq-read (one thread and two), stride, random and list-walk with --prefetch off vs auto
#   (and pointer for list-walk and random), then bfs and quicksort at 25% and 50% local
#   memory vs 100%.
# usage: sudo [SIZE=512M] [GRAPH_SIZE=128M] [SORT_SIZE=128M] [STRIDE=16] bench/prefetch.sh
#   JSON=1 also prints every run's JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE:-512M}
graph_size=${GRAPH_SIZE:-128M}
sort_size=${SORT_SIZE:-128M}
stride=${STRIDE:-16}
cargo build --release -q -p clustermem-cli
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
floor=$(../shared/floor/run)
for mode in off auto; do
  run "seq-read $mode" seq-read --size "$size" --local-mem 25% --prefetch $mode
  run "seq-read 2 threads $mode" seq-read --threads 2 --size "$size" --local-mem 25% --prefetch $mode
  run "stride $mode" stride --stride "$stride" --size "$size" --local-mem 25% --prefetch $mode
done
for mode in off auto pointer; do
  run "list-walk $mode" list-walk --size "$size" --local-mem 25% --prefetch $mode
done
# random: the same work in every mode (nothing to predict; pointer also checks it stays quiet
# on data without pointers), so three interleaved runs each, compared by median.
for rep in 1 2 3; do
  for mode in off auto pointer; do
    run "random $mode" random --size "$size" --local-mem 25% --prefetch $mode
  done
done
for local in 100% 50% 25%; do
  run "bfs" bfs --size "$graph_size" --local-mem $local
  run "quicksort" quicksort --size "$sort_size" --local-mem $local
done
python3 - "$runs" "$floor" "${JSON:-0}" <<'EOF'
import json, statistics, sys

runs = [line.rstrip("\n").split("\t", 1) for line in open(sys.argv[1])]
floor = json.loads(sys.argv[2])
print(f"floor: tcp_stream {floor['tcp_stream_gb_s']} GB/s, remote fault p50 "
      f"{floor['remote_fault_p50_us']} us (blocking)")
print()
print("| run | size, local | wall s | ops | remote faults | waits on prefetch | ops per blocking fault "
      "| prefetch issued (pointer; chains followed by hosts) | GB/s | verified |")
print("|---|---|---|---|---|---|---|---|---|---|")
base = {}
for label, text in runs:
    r = json.loads(text)
    blocking = r["remote_faults"] + r["prefetch_waits"]
    per_fault = f"{r['ops'] / blocking:.1f}" if blocking else "-"
    gbs = ""
    if r["workload"] == "seq-read":
        gbs = f"{r['size_bytes'] / r['wall_s'] / 1e9:.3f} ({r['size_bytes'] / r['wall_s'] / 1e9 / floor['tcp_stream_gb_s']:.0%} of floor)"
    local = f"{r['size_bytes'] >> 20} MiB, {100 * r['local_mem_bytes'] // r['size_bytes']}%"
    print(f"| {label} | {local} | {r['wall_s']:.2f} | {r['ops']} | {r['remote_faults']} | {r['prefetch_waits']} "
          f"| {per_fault} | {r['prefetch_issued']} ({r['pointer_prefetch_issued']}; {r['pointer_chains_offloaded']}) "
          f"| {gbs} | {r['verified']} |")
    if sys.argv[3] == "1":
        print(text)
walls = {}
for label, text in runs:
    if label.startswith("random "):
        walls.setdefault(label.split()[1], []).append(json.loads(text)["wall_s"])
off = statistics.median(walls["off"])
print()
print(f"random, median wall s of {len(walls['off'])} interleaved runs: off {off:.2f}" + "".join(
    f", {mode} {statistics.median(w):.2f} ({statistics.median(w) / off - 1:+.1%})"
    for mode, w in walls.items() if mode != "off"))
bad = [label for label, text in runs if not json.loads(text)["verified"]]
if bad:
    sys.exit(f"NOT VERIFIED: {', '.join(bad)}")
EOF
