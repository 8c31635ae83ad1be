#!/usr/bin/env bash
# The core speed goal, measured so that the machine's drift cancels: `random` at 25% local
# memory in both modes against the floor (../shared/floor/run) taken right before and right
# after each run, for ROUNDS rounds. This VM's floor moves 12-18 us (spin) and 31-39 us
# (blocking) between minutes, so one floor and one run an hour apart can say 1.3x or 1.9x for
# the same code; each run here is divided by the mean of the two floors around it.
# Prints one JSON line per run and a summary (medians) on stderr. Root (userfaultfd).
# usage: sudo bench/ratio.sh [ROUNDS=3] [SIZE=2G] [OPS=400000]
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    ROUNDS=*|SIZE=*|OPS=*) export "${arg?}" ;;
    *) echo "ratio: unknown argument '$arg' (expected ROUNDS=, SIZE= or OPS=; see --help)" >&2; exit 2 ;;
  esac
done
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-2G}
OPS=${OPS:-400000}
cargo build --release -q -p clustermem-cli
bin=target/release/clustermem
floor() { ../shared/floor/run 20000; }
results=$(mktemp)
trap 'rm -f "$results"' EXIT
before=$(floor)
for round in $(seq 1 "$ROUNDS"); do
  for mode in default low-latency; do
    flag=()
    [ "$mode" = low-latency ] && flag=(--low-latency)
    run=$("$bin" bench random --size "$SIZE" --local-mem 25% --ops "$OPS" "${flag[@]}" --json)
    after=$(floor)
    line=$(python3 - "$round" "$mode" "$before" "$run" "$after" <<'PY'
import json, sys
round_, mode, before, run, after = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
key = "remote_fault_spin_p50_us" if mode == "low-latency" else "remote_fault_p50_us"
floor = (before[key] + after[key]) / 2
print(json.dumps({"round": int(round_), "mode": mode, "fault_p50_us": run["fault_p50_us"],
                  "us_per_op": run["us_per_op"], "floor": key, "floor_before_us": before[key],
                  "floor_after_us": after[key], "ratio": round(run["fault_p50_us"] / floor, 3),
                  "verified": run["verified"]}))
PY
)
    echo "$line" | tee -a "$results"
    before=$after
  done
done
python3 - "$results" >&2 <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for mode, goal, floor in (("default", 1.5, "blocking"), ("low-latency", 1.5, "spin")):
    r = [x for x in rows if x["mode"] == mode]
    ratios = [x["ratio"] for x in r]
    print(f"{mode:12s} p50 {statistics.median(x['fault_p50_us'] for x in r):6.2f} us, "
          f"{statistics.median(x['us_per_op'] for x in r):6.2f} us/op; vs the floor's {floor} p50 around it: "
          f"{', '.join(f'{v:.2f}x' for v in ratios)} (median {statistics.median(ratios):.2f}x; goal {goal}x)")
PY
