#!/usr/bin/env bash
# The redundancy figures of the README, in one run (root; ~3 minutes on 2 cores at the
# defaults), with the floor measured in the same run. Seven memory-host processes on
# 127.0.0.11..17, then:
#   1. fault latency: bench random over the first six hosts with none, replicate:2,
#      erasure:2+1, erasure:4+2 (ratio of each p50 to none's);
#   2. memory on the hosts: `clustermem status` polled while each region is mapped, total
#      used bytes / region size (expected 1, 2, 1.5, 1.5);
#   3. rebuild: the same runs over all seven hosts (so even an erasure:4+2 span has a host to
#      rebuild onto), one host killed (SIGKILL) 3 s in; rebuild time and GB/s from the loss to
#      every lost shard rebuilt. The host is restarted empty before the next run.
# usage: sudo [SIZE=256M] [OPS=200000] bench/redundancy.sh    (JSON=1 prints every JSON line)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE:-256M}
ops=${OPS:-200000}
cargo build --release -q -p clustermem-cli
bin=target/release/clustermem
work=$(mktemp -d)
declare -A pids
six=""
for i in 1 2 3 4 5 6; do six="$six,127.0.0.1$i:7070"; done
six=${six#,}
seven="$six,127.0.0.17:7070"
start_host() { # start_host N
  "$bin" host --listen "127.0.0.1$1:7070" --capacity 4G 2>>"$work/host$1.log" &
  pids[$1]=$!
}
stop_all() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop_all EXIT
for i in 1 2 3 4 5 6 7; do start_host $i; done
for i in 1 2 3 4 5 6 7; do
  until "$bin" status --hosts "127.0.0.1$i:7070" --timeout 1s >/dev/null 2>&1; do sleep 0.1; done
done
floor=$(../shared/floor/run)

# measure LABEL KILL REDUNDANCY HOSTS: one bench run; while it runs, the hosts' peak used
# bytes; with KILL=1, the host holding the most of it is killed 3 s in (and restarted after).
measure() {
  local label=$1 kill=$2 r=$3 hosts=$4
  echo "running $label: bench random --size $size --local-mem 25% --ops $ops --redundancy $r" >&2
  "$bin" bench random --size "$size" --local-mem 25% --ops "$ops" --hosts "$hosts" \
    --redundancy "$r" --json >"$work/out" 2>>"$work/bench.log" &
  local bench=$! peak=0 started=$SECONDS victim=0
  while kill -0 $bench 2>/dev/null; do
    # (status exits 1 once a host is down: its JSON is still complete.)
    # Prints the total used bytes and the index (1..7) of the host using the most.
    read -r used busiest < <({ "$bin" status --hosts "$hosts" --json 2>/dev/null || true; } |
      python3 -c 'import json,sys
h = json.load(sys.stdin)["hosts"]
used = [x["used_bytes"] or 0 for x in h]
print(sum(used), 1 + used.index(max(used)))' 2>/dev/null || echo 0 0)
    ((used > peak)) && peak=$used
    if ((kill == 1 && SECONDS - started >= 3)); then
      victim=$busiest
      kill -9 "${pids[$victim]}"
      kill=2
    fi
    sleep 0.3
  done
  wait $bench
  if ((kill == 2)); then
    start_host "$victim"
    until "$bin" status --hosts "127.0.0.1$victim:7070" --timeout 1s >/dev/null 2>&1; do sleep 0.1; done
  fi
  printf '%s\t%s\t%s\n' "$label" "$peak" "$(cat "$work/out")" >>"$work/runs"
}
for r in none replicate:2 erasure:2+1 erasure:4+2; do measure "$r" 0 "$r" "$six"; done
for r in replicate:2 erasure:2+1 erasure:4+2; do measure "$r, 7 hosts, one killed" 1 "$r" "$seven"; done

python3 - "$work/runs" "$floor" "${JSON:-0}" <<'EOF'
import json, sys

floor = json.loads(sys.argv[2])
runs = []
for line in open(sys.argv[1]):
    label, peak, text = line.rstrip("\n").split("\t", 2)
    runs.append((label, int(peak), json.loads(text)))
print(f"floor: remote fault p50 {floor['remote_fault_p50_us']} us, tcp_stream {floor['tcp_stream_gb_s']} GB/s")
print()
none_p50 = next(r["fault_p50_us"] for label, _, r in runs if label == "none")
# Bytes per changed line: how many lines a run writes back varies with its twin sampling, so
# the wire cost of redundancy shows per line.
print("| redundancy | fault p50 us | vs none | p99 us | host memory / region | write-back bytes per changed line "
      "| hosts lost | pages rebuilt | rebuild s | rebuild GB/s | verified |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for label, peak, r in runs:
    rebuild = r["rebuild_s"]
    gbs = f"{r['bytes_rebuilt'] / rebuild / 1e9:.2f}" if rebuild else "-"
    print(f"| {label} | {r['fault_p50_us']:.1f} | {r['fault_p50_us'] / none_p50:.2f}x | {r['fault_p99_us']:.1f} "
          f"| {peak / r['size_bytes']:.2f} | {r['bytes_written_back'] / max(r['dirty_lines_written'], 1):.0f} | {r['hosts_lost']} "
          f"| {r['pages_rebuilt']} | {rebuild if rebuild is None else round(rebuild, 2)} | {gbs} | {r['verified']} |")
if sys.argv[3] == "1":
    for label, _, r in runs:
        print(label, json.dumps(r))
EOF
