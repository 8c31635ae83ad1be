# Linux swap as a baseline: a swap file and a memory cgroup limited to the local budget, set
# up and torn down for a benchmark script. Source it after defining die() and note(), with
# CGROUP (auto|v2|v1), WORKDIR, local_b (the cgroup limit) and swap_b (the swap file size)
# set. It leaves: $cg (the cgroup), $cgver, $swapfile, $tmpdir (a scratch directory), the
# helpers cg_peak, cg_reset_peak, cg_oom_kills, vmstat and in_cgroup CMD..., and an EXIT
# trap that kills what is left in the cgroup, removes it, and swapoffs and deletes the swap
# file (swap that was on before is left alone).

[ "$(id -u)" -eq 0 ] || die "must run as root (swapon, mkswap and cgroup setup need it)"
for t in mkswap swapon swapoff; do command -v "$t" >/dev/null || die "$t not found"; done

# ---- cgroup memory controller --------------------------------------------------------------
fstype() { stat -f -c %T "$1" 2>/dev/null || echo none; }
v2root=""
if [ "$(fstype /sys/fs/cgroup)" = cgroup2fs ]; then v2root=/sys/fs/cgroup
elif [ -d /sys/fs/cgroup/unified ] && [ "$(fstype /sys/fs/cgroup/unified)" = cgroup2fs ]; then v2root=/sys/fs/cgroup/unified
fi
v2_ok=false
if [ -n "$v2root" ] && grep -qw memory "$v2root/cgroup.controllers" 2>/dev/null; then v2_ok=true; fi
v1root=/sys/fs/cgroup/memory
v1_ok=false
if [ "$(fstype $v1root)" = cgroupfs ] && [ -f $v1root/memory.limit_in_bytes ]; then v1_ok=true; fi

case "$CGROUP" in
  v2|auto)
    if $v2_ok; then cgver=v2
    elif [ "$CGROUP" = auto ] && $v1_ok; then
      cgver=v1
      note "NOTE: the cgroup v2 memory controller is unavailable (${v2root:-no cgroup2 mount}; hybrid hierarchy,"
      note "      memory is bound to cgroup v1 at $v1root). Using the v1 memory controller:"
      note "      memory.limit_in_bytes=LOCAL, memory.memsw.limit_in_bytes=-1 (swap unlimited)."
    else
      die "cgroup v2 memory controller unavailable (cgroup2 mount: ${v2root:-none}; controllers: $(cat "${v2root:-/nonexistent}/cgroup.controllers" 2>/dev/null || echo n/a))"
    fi ;;
  v1) $v1_ok || die "cgroup v1 memory controller not mounted at $v1root"; cgver=v1 ;;
  *) die "CGROUP must be auto, v2 or v1" ;;
esac

# ---- cleanup (installed before anything is created) ----------------------------------------
swapfile=""
swap_added=false
cg=""
enabled_subtree=false
cleanup() {
  local rc=$?
  set +e
  if [ -n "$cg" ] && [ -d "$cg" ]; then
    # Anything still in the cgroup was started by this script (e.g. after ctrl-c).
    local pids pid i
    for i in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(cat "$cg/cgroup.procs" 2>/dev/null)
      [ -z "$pids" ] && break
      for pid in $pids; do kill -KILL "$pid" 2>/dev/null; done
      sleep 0.2
    done
    for i in 1 2 3 4 5 6 7 8 9 10; do rmdir "$cg" 2>/dev/null && break; sleep 0.3; done
    [ -d "$cg" ] && echo "swapbench: WARNING: could not remove cgroup $cg" >&2
  fi
  if $enabled_subtree; then echo -memory > "$v2root/cgroup.subtree_control" 2>/dev/null; fi
  if $swap_added; then
    swapoff "$swapfile" || echo "swapbench: WARNING: swapoff $swapfile failed" >&2
  fi
  if [ -n "$swapfile" ] && ! grep -q "^$swapfile " /proc/swaps; then rm -f "$swapfile"; fi
  [ -n "${tmpdir:-}" ] && rm -rf "$tmpdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tmpdir=$(mktemp -d)

# ---- swap file -----------------------------------------------------------------------------
mkdir -p "$WORKDIR"
wd_fs=$(findmnt -no FSTYPE -T "$WORKDIR" 2>/dev/null || fstype "$WORKDIR")
case "$wd_fs" in
  tmpfs|ramfs|overlayfs|overlay|nfs|fuse*|squashfs|cgroup*|proc|sysfs)
    die "WORKDIR=$WORKDIR is on $wd_fs, which cannot hold a swap file; set WORKDIR to a directory on a disk filesystem (ext4, xfs, btrfs)" ;;
esac
avail_b=$(( $(df -Pk "$WORKDIR" | awk 'NR==2 {print $4}') * 1024 ))
[ "$avail_b" -gt $((swap_b + 256 * 1024 * 1024)) ] || die "WORKDIR=$WORKDIR has $((avail_b >> 20)) MiB free; the swap file needs $((swap_b >> 20)) MiB"

swap_before=$(awk 'NR>1' /proc/swaps)
if [ -n "$swap_before" ]; then
  note "swap already on before this run (left alone; the kernel may use it too):"
  echo "$swap_before" >&2
fi
swapfile="$WORKDIR/clustermem-swapbench-$$.swap"
note "creating $((swap_b >> 20)) MiB swap file $swapfile ($wd_fs)"
rm -f "$swapfile"
( umask 077; : > "$swapfile" )
# btrfs needs NOCOW for swap files; harmless elsewhere.
[ "$wd_fs" = btrfs ] && chattr +C "$swapfile" 2>/dev/null || true
if ! fallocate -l "$swap_b" "$swapfile" 2>/dev/null; then
  note "fallocate failed; writing zeros with dd"
  dd if=/dev/zero of="$swapfile" bs=1M count=$((swap_b >> 20)) status=none conv=fsync
fi
chmod 600 "$swapfile"
mkswap "$swapfile" >/dev/null || die "mkswap $swapfile failed"
if ! swapon -p 32767 "$swapfile" 2>"$tmpdir/swapon.err"; then
  note "swapon with the fallocated file failed ($(cat "$tmpdir/swapon.err")); retrying with a dd-written file"
  rm -f "$swapfile"; ( umask 077; : > "$swapfile" )
  [ "$wd_fs" = btrfs ] && chattr +C "$swapfile" 2>/dev/null || true
  dd if=/dev/zero of="$swapfile" bs=1M count=$((swap_b >> 20)) status=none conv=fsync
  mkswap "$swapfile" >/dev/null || die "mkswap $swapfile failed"
  swapon -p 32767 "$swapfile" 2>"$tmpdir/swapon.err" \
    || die "swapon $swapfile failed on $wd_fs: $(cat "$tmpdir/swapon.err") -- set WORKDIR to a filesystem that supports swap files"
fi
swap_added=true
grep -q "^$swapfile " /proc/swaps || die "swapon reported success but $swapfile is not in /proc/swaps"

# ---- cgroup --------------------------------------------------------------------------------
if [ "$cgver" = v2 ]; then
  cg="$v2root/clustermem-swapbench-$$"
  if ! grep -qw memory "$v2root/cgroup.subtree_control"; then
    echo +memory > "$v2root/cgroup.subtree_control" || die "cannot enable the memory controller in $v2root/cgroup.subtree_control"
    enabled_subtree=true
  fi
  mkdir "$cg"
  [ -f "$cg/memory.max" ] || die "$cg has no memory.max (memory controller not enabled for it)"
  echo "$local_b" > "$cg/memory.max"
  if [ -f "$cg/memory.swap.max" ]; then echo max > "$cg/memory.swap.max"
  else note "WARNING: $cg has no memory.swap.max (swap accounting off?); swap is not limited"; fi
  [ "$(cat "$cg/memory.max")" = "$local_b" ] || die "memory.max did not take: $(cat "$cg/memory.max")"
else
  cg="$v1root/clustermem-swapbench-$$"
  mkdir "$cg"
  [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo -1 > "$cg/memory.memsw.limit_in_bytes"
  echo "$local_b" > "$cg/memory.limit_in_bytes"
  [ "$(cat "$cg/memory.limit_in_bytes")" = "$local_b" ] || die "memory.limit_in_bytes did not take: $(cat "$cg/memory.limit_in_bytes")"
fi
cg_swappiness=$(cat "$cg/memory.swappiness" 2>/dev/null || cat /proc/sys/vm/swappiness)
note "cgroup $cgver $cg: limit $local_b bytes, swappiness $cg_swappiness"

cg_peak() {
  if [ "$cgver" = v2 ]; then cat "$cg/memory.peak" 2>/dev/null || echo null
  else cat "$cg/memory.max_usage_in_bytes"; fi
}
cg_reset_peak() { # v1 only; v2's memory.peak is the cgroup's lifetime maximum
  [ "$cgver" = v1 ] && echo 0 > "$cg/memory.max_usage_in_bytes" || true
}
cg_oom_kills() {
  if [ "$cgver" = v2 ]; then awk '$1 == "oom_kill" {print $2}' "$cg/memory.events"
  else awk '$1 == "oom_kill" {print $2}' "$cg/memory.oom_control"; fi
}
vmstat() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }


# in_cgroup CMD...: runs CMD inside the benchmark cgroup.
in_cgroup() {
  CG_PROCS="$cg/cgroup.procs" bash -c 'echo $$ > "$CG_PROCS"; exec "$@"' _ "$@"
}
