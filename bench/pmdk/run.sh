#!/usr/bin/env bash
# Runs the same transaction workload with PMDK libpmemobj and with clustermem-pmem, side by
# side, and prints the ratio. Both pools live in one directory (same disk and filesystem).
#
# usage: bench/pmdk/run.sh [SECONDS] [UPDATES_PER_TX] [THREADS...]   (default: 5 1 1 4)
# env:   CLUSTERMEM=path/to/clustermem (default target/release/clustermem; if absent, the
#        pmem crate's bench_tx example is used, as it is when the binary lacks `bench tx`),
#        BENCH_DIR (default target/bench-pools)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
secs=${1:-5}
updates=${2:-1}
shift $(( $# >= 2 ? 2 : $# ))
threads=("$@")
[ ${#threads[@]} -gt 0 ] || threads=(1 4)
dir=${BENCH_DIR:-$repo/target/bench-pools}
mkdir -p "$dir"
unset PMEM_IS_PMEM_FORCE

if ! dpkg -s libpmemobj-dev >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpmemobj-dev >/dev/null
fi
cc -O2 -Wall -o "$dir/pmdk_tx" "$here/pmdk_tx.c" -lpmemobj -lpmem -lpthread

clustermem=${CLUSTERMEM:-$repo/target/release/clustermem}
# Use the CLI only if it already has `bench tx`; otherwise the crate's own example.
if [ ! -x "$clustermem" ] || ! "$clustermem" bench tx --help >/dev/null 2>&1; then
  clustermem=""
  (cd "$repo" && cargo build -q --release -p clustermem-pmem --example bench_tx)
fi
echo "pools in $dir: $(df -T "$dir" | awk 'NR==2 {print $1, $2}')"

json_field() { sed -n "s/.*\"$1\":\([0-9.e+]*\).*/\1/p"; }

printf '%-8s %-8s %14s %14s %8s %s\n' threads updates pmdk_tx_per_s pmem_tx_per_s ratio pmem_bytes_logged_per_tx
for t in "${threads[@]}"; do
  rm -f "$dir/pmdk.pool" "$dir/clustermem.pool"
  pmdk=$("$dir/pmdk_tx" "$dir/pmdk.pool" "$secs" "$updates" "$t")
  if [ -n "$clustermem" ]; then
    ours=$("$clustermem" bench tx --pool "$dir/clustermem.pool" --updates-per-tx "$updates" --threads "$t" --seconds "$secs" --json)
  else
    ours=$("$repo/target/release/examples/bench_tx" --pool "$dir/clustermem.pool" \
      --updates-per-tx "$updates" --threads "$t" --seconds "$secs")
  fi
  echo "pmdk:       $pmdk" >&2
  echo "clustermem: $ours" >&2
  a=$(echo "$pmdk" | json_field tx_per_s)
  b=$(echo "$ours" | json_field tx_per_s)
  logged=$(echo "$ours" | json_field bytes_logged_per_tx)
  printf '%-8s %-8s %14.0f %14.0f %8.1f %s\n' "$t" "$updates" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN {print b / a}')" "$logged"
done
rm -f "$dir/pmdk.pool" "$dir/clustermem.pool"
