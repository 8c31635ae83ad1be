#!/usr/bin/env bash
# Where a remote fault's time goes, step by step, for clustermem and for the floor, in one run.
#
# Traces 200 ms (ftrace: the few syscall, scheduler and page-fault events a fault makes,
# filtered) of
#   clustermem bench random --size SIZE --local-mem 25% MODE   (after its fill)
# and of the busy-polling phase of ../shared/floor (the cheapest remote fault on this machine),
# then prints for each the median of every step of a remote fault:
#   fault  the program touches a missing page        read   the handler reads the fault
#   send   its request leaves (the send call)        srecv  the host has it
#   ssend  the host's reply leaves (the send call)   recv   the handler has the page
#   copy   UFFDIO_COPY (installs, wakes the thread)  run    the thread runs again
# and on which CPUs the program, the handler and the host ran. Tracing costs each event
# ~0.3 us: compare the two columns with each other, not with untraced figures.
#
# usage: sudo bench/fault-path/trace.sh [SIZE=2G] [MODE=--low-latency] [DELAY=8] [FLOOR_C=path]
#   DELAY: seconds from the bench's start to the trace (its fill of SIZE should be over by then;
#          ~4.5 s for 2G on the 2-core VM). MODE="" traces the default (blocking) mode.
#   FLOOR_C: the floor's source (default ../shared/floor/floor.c beside the repository); the
#          floor column is left out if it is missing.
# Needs root (tracefs) and gcc for the floor.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
for arg in "$@"; do
  case $arg in
    SIZE=*|MODE=*|DELAY=*|FLOOR_C=*) declare "$arg" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "trace.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
SIZE=${SIZE:-2G}; MODE=${MODE---low-latency}; DELAY=${DELAY:-8}
FLOOR_C=${FLOOR_C:-$repo/../shared/floor/floor.c}
die() { echo "trace.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (ftrace)"
T=/sys/kernel/tracing
[ -e $T/trace ] || mount -t tracefs nodev $T 2>/dev/null || die "no tracefs at $T"
bin=$repo/target/release/clustermem
[ -x "$bin" ] || die "no $bin: cargo build --release first"
work=$(mktemp -d)
events=(syscalls/sys_exit_read syscalls/sys_enter_sendto syscalls/sys_exit_sendto
  syscalls/sys_exit_recvfrom syscalls/sys_enter_ioctl syscalls/sys_exit_ioctl
  sched/sched_switch sched/sched_wakeup exceptions/page_fault_user)
reset() {
  echo 0 > $T/tracing_on
  for e in "${events[@]}"; do echo 0 > "$T/events/$e/enable"; done
  echo 0 > $T/events/syscalls/sys_exit_read/filter
  echo 0 > $T/events/syscalls/sys_exit_recvfrom/filter
  echo > $T/trace
}
buffer_kb=$(cat $T/buffer_size_kb)
bench= floor=
cleanup() {
  for pid in $bench $floor; do kill "$pid" 2>/dev/null || true; done
  reset 2>/dev/null || true
  echo "$buffer_kb" > $T/buffer_size_kb 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Traces 200 ms into $1, events on.
capture() {
  reset
  echo 16384 > $T/buffer_size_kb
  echo 'ret > 0' > $T/events/syscalls/sys_exit_read/filter
  echo 'ret > 0' > $T/events/syscalls/sys_exit_recvfrom/filter
  for e in "${events[@]}"; do echo 1 > "$T/events/$e/enable"; done
  echo 1 > $T/tracing_on; sleep 0.2; echo 0 > $T/tracing_on
  cat $T/trace > "$1"
  reset
}

echo "trace.sh: clustermem bench random --size $SIZE --local-mem 25% $MODE (trace at ${DELAY}s)" >&2
# shellcheck disable=SC2086 # MODE is zero or one flag
"$bin" bench random --size "$SIZE" --local-mem 25% $MODE --ops 100000000 --json > /dev/null &
bench=$!
sleep "$DELAY"
kill -0 $bench 2>/dev/null || die "the bench ended before the trace (see its output above)"
capture "$work/clustermem.txt"
# The fill takes longer on a slow day: a trace taken during it holds no remote fault. Try
# again later rather than report nothing.
for attempt in 2 3 4 5 6; do
  python3 "$repo/bench/fault-path/breakdown.py" clustermem "$work/clustermem.txt" >/dev/null 2>&1 && break
  [ "$attempt" -lt 6 ] || die "no complete remote fault in 5 traces 5 s apart (is the fill of $SIZE that slow? raise DELAY)"
  echo "trace.sh: no complete remote fault traced yet (the fill may still be running): again in 5 s" >&2
  sleep 5
  kill -0 $bench 2>/dev/null || die "the bench ended before a remote fault was traced"
  capture "$work/clustermem.txt"
done
kill $bench; wait $bench 2>/dev/null || true
bench=
columns=(clustermem "$work/clustermem.txt")

if [ -f "$FLOOR_C" ]; then
  echo "trace.sh: floor ($FLOOR_C), its busy-polling phase" >&2
  gcc -O2 -pthread -o "$work/floor" "$FLOOR_C"
  "$work/floor" 100000 > /dev/null &
  floor=$!
  # Its blocking phase comes first; in the busy-polling one two threads are always running
  # (seen in 8 samples in a row, 20 ms apart).
  seen=0
  for _ in $(seq 1 3000); do
    kill -0 "$floor" 2>/dev/null || die "the floor ended before its busy-polling phase was seen"
    running=$({ cat /proc/"$floor"/task/*/stat 2>/dev/null || true; } | awk '$3 == "R"' | wc -l)
    if [ "$running" -ge 2 ]; then seen=$((seen + 1)); else seen=0; fi
    [ $seen -ge 8 ] && break
    sleep 0.02
  done
  [ $seen -ge 8 ] || die "the floor's busy-polling phase never came"
  capture "$work/floor.txt"
  wait $floor || true
  floor=
  columns+=(floor "$work/floor.txt")
else
  echo "trace.sh: no floor source at $FLOOR_C: clustermem only" >&2
fi
python3 "$repo/bench/fault-path/breakdown.py" "${columns[@]}"
