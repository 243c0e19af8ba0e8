#!/usr/bin/env bash
# Usage: bench/run.sh [--quick] [--reps N] [--runtime S] [--ramp S] [--out DIR]
#                     [--cases "C1 C2..."] [--devices "D1 D2..."] [--sched NAME|keep]
#                     [--bin PATH] [--no-build] [--label TEXT] [--wait-idle MIN]
#                     [--no-wq-pin] [--suite loop|cache] [--mem MIB] [--alternate]
#                     [--flash tmpfs|ext4]
#   Benchmarks ublk-http against the kernel loop driver inside the qemu TCG
#   VM (see bench/README.md): builds the static binary (tests/build-static.sh),
#   packs $UBLK_VM_CACHE/initramfs-bench.cpio, boots the VM once (--smp 2) and
#   runs bench/guest.sh there, which prints @@RESULT lines.  Then writes
#   DIR/bench-console.log, DIR/bench-hostmon.json (host disturbance per run,
#   see bench/hostmon.py), DIR/results.json, DIR/chart.png and prints the table.
#     --quick       1 rep of 3 s runs (ramp 1 s): a smoke test, ~2.5 min + build
#                   (the full run: ~10-11 min + build)
#     --reps N      interleaved repetitions of every case x device (default 3)
#     --runtime S   seconds measured per fio run (default 10), --ramp S (2)
#     --out DIR     results directory (default bench/results)
#     --cases, --devices   subsets, names as in bench/guest.sh
#     --sched       I/O scheduler set on every device (default none)
#     --bin PATH    use this ublk-http binary; --no-build: use the last
#                   .build-static/release/ublk-http without rebuilding
#     --wait-idle MIN  before booting, wait up to MIN minutes for the host to
#                   be idle (other processes < 20% of a core over 5 s)
#     --no-wq-pin   let the kernel's unbound workqueues (the loop driver's
#                   workers) run on any vCPU; by default they are confined to
#                   the server vCPU, like the ublk-http server
#     --suite cache the issue-4 suite: the kernel loop device and the cache
#                   target in write-through and write-back mode, each with and
#                   without dirty tracking (--devices defaults to those five,
#                   --mem to 4096, --out to bench/results-cache; ~17 min);
#                   the report adds what dirty tracking costs (4k randwrite)
#                   (default suite: loop, the issue-2 devices)
#     --mem MIB     guest memory (default 2048; 4096 for --suite cache,
#                   6144 with --flash ext4)
#     --flash ext4  cache suite: kloop's file and the cache files on ext4 on a
#                   RAM disk (brd) instead of tmpfs, so the cache target runs
#                   its io_uring path as on a flash disk (--out default
#                   bench/results-cache-ext4)
#     --alternate   every other rep runs the devices in reverse order
#     --label TEXT  what was measured, for the report (default: the git
#                   revision, +dirty when Sources/ has uncommitted changes)
#   Exit status: 0 when every run produced a result, 1 otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

QUICK=0 REPS="" RUNTIME="" RAMP="" OUT="$ROOT/bench/results" CASES="" DEVICES="" SCHED="none" BIN="" BUILD=1 LABEL="" WAIT_IDLE=0 WQ_PIN=1
SUITE=loop MEM="" ALTERNATE=0 OUT_SET=0 FLASH=tmpfs
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --reps) REPS="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --ramp) RAMP="$2"; shift 2 ;;
        --out) OUT="$2"; OUT_SET=1; shift 2 ;;
        --suite) SUITE="$2"; shift 2 ;;
        --mem) MEM="$2"; shift 2 ;;
        --alternate) ALTERNATE=1; shift ;;
        --flash) FLASH="$2"; shift 2 ;;
        --cases) CASES="$2"; shift 2 ;;
        --devices) DEVICES="$2"; shift 2 ;;
        --sched) SCHED="$2"; shift 2 ;;
        --bin) BIN="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --label) LABEL="$2"; shift 2 ;;
        --wait-idle) WAIT_IDLE="$2"; shift 2 ;;
        --no-wq-pin) WQ_PIN=0; shift ;;
        -h|--help) usage ;;
        *) echo "bench/run.sh: unknown argument $1" >&2; usage ;;
    esac
done
case "$SUITE" in
    loop) MEM=${MEM:-2048} ;;
    cache) if [[ $FLASH == ext4 ]]; then MEM=${MEM:-6144}; else MEM=${MEM:-4096}; fi
           DEVICES=${DEVICES:-kloop ublk-cache-through ublk-cache-through-notrack ublk-cache-back ublk-cache-back-notrack}
           if [[ $OUT_SET == 0 ]]; then OUT="$ROOT/bench/results-cache"; [[ $FLASH == tmpfs ]] || OUT+="-$FLASH"; fi ;;
    *) echo "bench/run.sh: --suite is loop or cache, not '$SUITE'" >&2; exit 2 ;;
esac
[[ $FLASH == tmpfs || $FLASH == ext4 ]] || { echo "bench/run.sh: --flash is tmpfs or ext4, not '$FLASH'" >&2; exit 2; }
[[ $FLASH == tmpfs || $SUITE == cache ]] || { echo "bench/run.sh: --flash applies to --suite cache only" >&2; exit 2; }
[[ "$MEM" =~ ^[0-9]+$ && "$MEM" -ge 512 ]] || { echo "bench/run.sh: bad --mem '$MEM' (MiB, >= 512)" >&2; exit 2; }
if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-1} RUNTIME=${RUNTIME:-3} RAMP=${RAMP:-1} WARMUP=1 WAITB=45 RETRYB=4
else
    REPS=${REPS:-3} RUNTIME=${RUNTIME:-10} RAMP=${RAMP:-2} WARMUP=2 WAITB=150 RETRYB=8
fi
for v in REPS RUNTIME RAMP; do
    [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || { echo "bench/run.sh: bad ${v,,} '${!v}'" >&2; exit 2; }
done
[[ $RUNTIME -ge 2 ]] || { echo "bench/run.sh: --runtime must be >= 2" >&2; exit 2; }

source "$ROOT/vm/lib.sh"
blog() { echo "[bench] $*" >&2; }

# ---- tools: gnuplot for the chart (python3 for the report is in the base system) --------------
if ! command -v gnuplot >/dev/null 2>&1; then
    blog "installing gnuplot-nox"
    export DEBIAN_FRONTEND=noninteractive
    vm_wait_apt
    apt-get install -y -q --no-install-recommends gnuplot-nox >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends gnuplot-nox >/dev/null; } \
        || blog "WARNING: cannot install gnuplot-nox; no chart"
fi
PY=$(command -v python3 || true)
[[ -n "$PY" ]] || vm_ensure python3:python3
PY=$(command -v python3)

# ---- build, initramfs ------------------------------------------------------------------------------
vm/kernel.sh >/dev/null
if [[ -z "$BIN" ]]; then
    if [[ $BUILD == 1 ]]; then
        blog "building the static binary (tests/build-static.sh)"
        BIN="$(tests/build-static.sh)"
    else
        BIN="$ROOT/.build-static/release/ublk-http"
    fi
fi
[[ -x "$BIN" ]] || { echo "bench/run.sh: no binary $BIN" >&2; exit 1; }
mkdir -p "$VM_CACHE"
# host_busy: busy ticks (USER_HZ) of all host CPUs so far.
host_busy() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
# wait_idle MIN: waits up to MIN minutes for the host to be idle.
wait_idle() {
    local deadline=$((SECONDS + $1 * 60)) b0 b1 busy
    while :; do
        b0=$(host_busy); sleep 5; b1=$(host_busy)
        busy=$(( (b1 - b0) / 5 ))
        [[ $busy -lt 20 ]] && { blog "host idle (${busy}% of a core busy)"; return 0; }
        [[ $SECONDS -ge $deadline ]] && { blog "WARNING: the host is still busy (${busy}% of a core); running anyway"; return 0; }
        blog "host busy (${busy}% of a core), waiting"
        sleep 25
    done
}
[[ $WAIT_IDLE -gt 0 ]] && wait_idle "$WAIT_IDLE"
# One benchmark at a time (two would disturb each other and share the
# initramfs; bench/http.sh takes the same lock).  The lock file is only kept
# open while this run holds the lock.
LOCK="$VM_CACHE/bench.lock" lock_deadline=$((SECONDS + 1800)) waited=0
while :; do
    exec 9>"$LOCK"
    flock -n 9 && break
    exec 9>&-
    [[ $waited == 1 ]] || blog "another benchmark holds $LOCK; waiting for it (up to 30 min)"
    waited=1
    [[ $SECONDS -lt $lock_deadline ]] || { echo "bench/run.sh: still locked: $LOCK" >&2; exit 1; }
    sleep 10
done
[[ $waited == 1 && $WAIT_IDLE -gt 0 ]] && wait_idle 2
INITRD="$VM_CACHE/initramfs-bench.cpio"   # uncompressed: boots faster under TCG
KVER="$(cat "$("$VM_DIR/kernel.sh")/version")"
# Repacked when the binary (path, size, mtime), the kernel or anything under vm/ changed.
STAMP="$(realpath "$BIN") $(stat -c '%s %Y' "$BIN")"
if [[ ! -f "$INITRD" || "$(cat "$INITRD.bin" 2>/dev/null)" != "$STAMP" || "$(cat "$INITRD.kver" 2>/dev/null)" != "$KVER" ]] \
   || [[ -n "$(find "$VM_DIR" -type f -newer "$INITRD" -print -quit)" ]]; then
    blog "packing $INITRD with $BIN"
    rm -f "$INITRD.bin"
    vm/initramfs.sh "$INITRD" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq >/dev/null
    echo "$STAMP" > "$INITRD.bin"
fi

# ---- run ---------------------------------------------------------------------------------------------
mkdir -p "$OUT"
ncase=$(wc -w <<<"${CASES:-x x x x}") ndev=$(wc -w <<<"${DEVICES:-x x x}")
# Plus WAITB s of waiting for a quiet host and RETRYB repeats of disturbed runs at most (guest.sh).
# Plus a minute per device for its setup (the cache devices copy and read the image).
TIMEOUT=$(( 300 + WAITB + 60 * ndev + (REPS * ncase * ndev + RETRYB) * (RUNTIME + RAMP + 10) ))
HOST_BEFORE="$(cat /proc/loadavg)"
top -b -n1 -w 200 2>/dev/null | head -n 15 > "$OUT/bench-host-top-before.txt" || true
ENVS=(--env "BENCH_REPS=$REPS" --env "BENCH_RUNTIME=$RUNTIME" --env "BENCH_RAMP=$RAMP" --env "BENCH_SCHED=$SCHED" --env "BENCH_WARMUP=$WARMUP" --env "BENCH_WQ_PIN=$WQ_PIN"
      --env "BENCH_WAIT_BUDGET=$WAITB" --env "BENCH_RETRY_BUDGET=$RETRYB" --env "BENCH_ALTERNATE=$ALTERNATE" --env "BENCH_FLASH=$FLASH")
[[ -n "$CASES" ]] && ENVS+=(--env "BENCH_CASES=$CASES")
[[ -n "$DEVICES" ]] && ENVS+=(--env "BENCH_DEVICES=$DEVICES")
blog "booting the VM: $REPS rep(s) x ${CASES:-4 cases} x ${DEVICES:-3 devices}, ${RUNTIME}s + ${RAMP}s ramp per run (timeout ${TIMEOUT}s); host load $HOST_BEFORE"
# Disturbance check: host CPU time used by processes other than this run (the
# VM's qemu included, through `times`) while the VM runs.
# `times` must run in this shell (a subshell starts with zero children's times).
children_ticks() { awk 'END { n = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] } print int(n * 100) }' "$OUT/.times"; }
SOCK="/tmp/ublk-bench-hostmon.$$.sock"
trap 'rm -f "$SOCK" "$OUT/.times"' EXIT
times > "$OUT/.times"; B0=$(host_busy) C0=$(children_ticks)
T0=$SECONDS
set +e
for attempt in 1 2 3; do
    # hostmon.py passes the console through, times the guest's @@START/@@RESULT
    # lines, samples the host CPU used by other processes meanwhile and answers
    # the guest on a second serial port (its /dev/ttyS1, a unix socket here).
    rm -f "$SOCK"
    UBLK_VM_QEMU_ARGS="${UBLK_VM_QEMU_ARGS:-} -chardev socket,id=hostmon,path=$SOCK,server=on,wait=off -device isa-serial,chardev=hostmon" \
    vm/run.sh --initrd "$INITRD" --mem "$MEM" --smp 2 --timeout "$TIMEOUT" --log "$OUT/bench-console.log" \
        "${ENVS[@]}" --env BENCH_HOSTCHAN=/dev/ttyS1 bench/guest.sh \
        | "$PY" "$ROOT/bench/hostmon.py" --root $$ --out "$OUT/bench-hostmon.json" --chan "$SOCK"
    VRC=${PIPESTATUS[0]}
    # A guest that died before the script started (TCG occasionally oopses at
    # boot) is booted again.
    [[ $VRC != 0 ]] && ! grep -aq '@@META' "$OUT/bench-console.log" 2>/dev/null || break
    blog "the guest died before the benchmark started (status $VRC); booting again"
done
set -e
ELAPSED=$((SECONDS - T0))
times > "$OUT/.times"; B1=$(host_busy) C1=$(children_ticks); rm -f "$OUT/.times"
OTHER=$(awk -v b=$((B1 - B0)) -v c=$((C1 - C0)) -v t="$ELAPSED" 'BEGIN { o = (b - c) / (t > 0 ? t : 1); if (o < 0) o = 0; printf "%.0f", o }')
blog "host CPU used by other processes during the run: ${OTHER}% of one core (the VM uses ~200%)"
[[ $OTHER -le 15 ]] || blog "WARNING: the host was busy with other work (${OTHER}% of a core): the numbers are disturbed"
HOST_AFTER="$(cat /proc/loadavg)"
top -b -n1 -w 200 2>/dev/null | head -n 15 > "$OUT/bench-host-top-after.txt" || true
[[ $VRC == 0 ]] || blog "WARNING: the VM run ended with status $VRC"
[[ -f "$OUT/bench-console.log" ]] || { blog "no console log"; exit 1; }

# ---- report ------------------------------------------------------------------------------------------
if [[ -n "$LABEL" ]]; then
    GIT_REV="$LABEL"
else
    GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -n "$(git status --porcelain -- Sources Package.swift 2>/dev/null)" ]] && GIT_REV+="+dirty"
fi
"$PY" "$ROOT/bench/report.py" "$OUT" --host-load-before "$HOST_BEFORE" --host-load-after "$HOST_AFTER" \
    --elapsed "$ELAPSED" --host-other-cpu "$OTHER" --git "$GIT_REV" --vm-status "$VRC" --quick "$QUICK"
