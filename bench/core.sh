#!/usr/bin/env bash
# The core figures of the README, in one run (root; ~10 minutes on 2 cores):
#   floor, random (both modes), zipf hit rate against exact LRU, line vs page write-back,
#   and the cost per written page of each dirty-tracking mode.
# usage: sudo bench/core.sh [SIZE=2G]   (prints one JSON line per measurement)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
cargo build --release -q -p clustermem-cli -p clustermem-uffd --examples --bins
bin=target/release/clustermem
line() { printf '%s %s\n' "$1" "$2"; }
line floor "$(../shared/floor/run 20000)"
line random "$($bin bench random --size "$size" --local-mem 25% --json)"
line random-low-latency "$($bin bench random --size "$size" --local-mem 25% --low-latency --json)"
line zipf "$($bin bench zipf --size "$size" --local-mem 25% --json)"
line zipf-fifo "$($bin bench zipf --size "$size" --local-mem 25% --policy fifo --json)"
for wb in line page; do
  line "sparse-write-$wb" "$($bin bench sparse-write --size 512M --local-mem 25% --writeback $wb --json)"
  line "seq-write-$wb" "$($bin bench seq-write --size 512M --local-mem 25% --writeback $wb --json)"
  line "random-$wb" "$($bin bench random --size 512M --local-mem 25% --writeback $wb --json)"
  line "quicksort-$wb" "$($bin bench quicksort --size 128M --local-mem 25% --writeback $wb --json)"
done
line tracking-cost "$(target/release/examples/tracking_cost 65536)"
