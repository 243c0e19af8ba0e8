#!/usr/bin/env bash
# Usage: bench/run.sh [--suite loop|cache|http|flashcache] [--kernel "7 6.12"] [--quick]
#                     [--reps N] [--runtime S] [--ramp S] [--out DIR]
#                     [--cases "C1 C2..."] [--devices "D1 D2..."] [--sched NAME|keep]
#                     [--bin PATH] [--no-build] [--label TEXT] [--wait-idle MIN]
#                     [--no-wq-pin] [--mem MIB] [--alternate] [--flash tmpfs|ext4]
#                     [--warm-runtime S] [--no-nbd] [--no-kublk]
#        bench/run.sh --report DIR      (re-render DIR's report from its console log)
#   The one benchmark driver (see bench/README.md): builds the static binary
#   (tests/build-static.sh; for the cache suite also the selftests' kublk,
#   bench/kublk.sh), packs $UBLK_VM_CACHE/initramfs-bench-SUITE-KVER.cpio per
#   kernel, boots the qemu TCG VM once per kernel (--smp 2) and runs
#   bench/guest.sh there (the http suite: bench/guest-http.sh beside it),
#   which prints @@META/@@DEVICE/@@START/@@RESULT lines.  Then writes, per
#   boot, DIR/bench-console.log, DIR/bench-hostmon.json (host disturbance, see
#   bench/hostmon.py), DIR/results.json, DIR/chart.png and prints the table
#   (bench/report.py); with several kernels DIR/KERNEL/ per boot and, for the
#   cache suite, the goals table over all boots (DIR/goals.json).
#     --suite S     loop (default): ublk-http loop and null vs the kernel loop
#                   device; cache: the flash path (kloop, ublk-http loop, the
#                   cache target through/back with and without dirty tracking,
#                   -q 2, kublk --auto_zc and copy) on ext4 on a RAM disk, on
#                   7.x and 6.12 (BENCH.md "The flash path"); http: the http
#                   target cold and warm vs curl, the loop device and nbdkit
#                   (bench/HTTP.md); flashcache: the cache target vs dm-cache,
#                   dm-writecache and bcache over a dm-delay slow disk, 7.x
#                   only, one rep by default (bench/FLASHCACHE.md)
#     --kernel L    the kernels to boot, one VM run each: 7 (trixie-backports'
#                   newest) and/or 6.12 (default: "7 6.12" for cache, else
#                   UBLK_VM_KERNEL or 7)
#     --quick       1 rep of 3 s runs (ramp 1 s): a smoke test (flashcache:
#                   2 s runs, an eighth of the sizes, every case on ublk-wb and one case
#                   on each other device, no waiting for a quiet host)
#     --reps N      interleaved repetitions of every case x device (default 3)
#     --runtime S   seconds measured per fio run (default 10), --ramp S (2);
#                   http: seconds of each cold random run
#     --warm-runtime S  http: seconds of each warm run (default 10)
#     --out DIR     results directory (default bench/results, bench/results-cache,
#                   bench/results-http)
#     --cases, --devices   subsets, names as in bench/guest.sh (http: cases of
#                   bench/guest-http.sh)
#     --sched       I/O scheduler set on every device (default none)
#     --bin PATH    use this ublk-http binary; --no-build: use the last
#                   .build-static/release/ublk-http without rebuilding
#     --wait-idle MIN  before booting, wait up to MIN minutes for the host to
#                   be idle (other processes < 20% of a core over 5 s, no
#                   other qemu-system)
#     --no-wq-pin   let the kernel's unbound workqueues (the loop driver's
#                   workers) run on any vCPU; by default they are confined to
#                   the server vCPU, like the ublk-http server
#     --mem MIB     guest memory (default 2048; cache: 6144 on ext4, 4096 on
#                   tmpfs; flashcache: 5120)
#     --flash F     cache suite: ext4 (default: kloop's file and the cache
#                   files on ext4 on a brd RAM disk) or tmpfs (in memory)
#     --alternate   every other rep runs the devices in reverse order
#     --no-nbd      http: leave the nbdkit devices out
#     --boot-rtt MS http: the boot case's round trip to nginx, made by netem on
#                   the guest's loopback (default 50; 0: none, as before)
#     --no-kublk    cache: leave the kublk devices out
#     --label TEXT  what was measured, for the report (default: the git
#                   revision, +dirty when Sources/ has uncommitted changes)
#   Exit status: 0 when every run produced a result, 1 otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

QUICK=0 REPS="" RUNTIME="" RAMP="" WRUNTIME="" OUT="" CASES="" DEVICES="" SCHED="none" BIN="" BUILD=1 LABEL="" WAIT_IDLE=0 WQ_PIN=1
SUITE=loop MEM="" ALTERNATE=0 FLASH="" KERNELS="" NBD=1 KUBLK=1 REPORT_ONLY="" BOOT_RTT=50
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --reps) REPS="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --ramp) RAMP="$2"; shift 2 ;;
        --warm-runtime) WRUNTIME="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --suite) SUITE="$2"; shift 2 ;;
        --kernel|--kernels) KERNELS="$2"; shift 2 ;;
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
        --no-nbd) NBD=0; shift ;;
        --boot-rtt) BOOT_RTT="$2"; shift 2 ;;
        --no-kublk) KUBLK=0; shift ;;
        --report) REPORT_ONLY="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench/run.sh: unknown argument $1" >&2; usage ;;
    esac
done
PY=$(command -v python3 || true)
if [[ -n "$REPORT_ONLY" ]]; then
    [[ -n "$PY" ]] || { echo "bench/run.sh: python3 missing" >&2; exit 1; }
    grep -aq '"suite": *"flashcache"' "$REPORT_ONLY/bench-console.log" 2>/dev/null && exec "$PY" "$ROOT/bench/report_flashcache.py" "$REPORT_ONLY"
    exec "$PY" "$ROOT/bench/report.py" "$REPORT_ONLY"
fi
CACHE_DEVICES="kloop ublk-loop kublk-zc kublk ublk-cache-through ublk-cache-through-notrack ublk-cache-back ublk-cache-back-notrack ublk-cache-q2"
case "$SUITE" in
    loop) MEM=${MEM:-2048}; OUT=${OUT:-$ROOT/bench/results}; FLASH=${FLASH:-tmpfs}; KERNELS=${KERNELS:-${UBLK_VM_KERNEL:-7}}
          DEVICES=${DEVICES:-kloop ublk-loop ublk-null} ;;
    cache) FLASH=${FLASH:-ext4}
           if [[ $FLASH == ext4 ]]; then MEM=${MEM:-6144}; else MEM=${MEM:-4096}; fi
           DEVICES=${DEVICES:-$CACHE_DEVICES}
           [[ $KUBLK == 1 ]] || DEVICES=$(tr ' ' '\n' <<<"$DEVICES" | grep -v '^kublk' | paste -sd' ')
           CASES=${CASES:-randread-4k-qd32 randwrite-4k-qd32 seqread-1m-qd8 randread-4k-qd32-2j}
           OUT=${OUT:-$ROOT/bench/results-cache$([[ $FLASH == tmpfs ]] && echo -tmpfs)}; KERNELS=${KERNELS:-7 6.12} ;;
    http) MEM=${MEM:-2048}; OUT=${OUT:-$ROOT/bench/results-http}; FLASH=tmpfs; KERNELS=${KERNELS:-${UBLK_VM_KERNEL:-7}} ;;
    flashcache) MEM=${MEM:-5120}; OUT=${OUT:-$ROOT/bench/results-flashcache}; FLASH=tmpfs; KERNELS=${KERNELS:-7}
          [[ $KERNELS == 7 ]] || { echo "bench/run.sh: --suite flashcache runs on the 7.x guest only (--kernel 7)" >&2; exit 2; }
          DEVICES=${DEVICES:-slow flash-kloop flash-kublk-zc ublk-wt ublk-wb dmcache-wt dmcache-wb dmwritecache bcache-wt bcache-wb}
          [[ $KUBLK == 1 ]] || DEVICES=$(tr ' ' '\n' <<<"$DEVICES" | grep -v 'kublk' | paste -sd' ')
          CASES=${CASES:-hit-randread-4k-qd32 randwrite-4k-qd32 zipf-7030 scan fsync-write-4k-qd1 seqread-1m-qd8 seqwrite-1m-qd8}
          REPS=${REPS:-1}; [[ $QUICK == 1 ]] && RUNTIME=${RUNTIME:-2} ;;
    *) echo "bench/run.sh: --suite is loop, cache, http or flashcache, not '$SUITE'" >&2; exit 2 ;;
esac
[[ $FLASH == tmpfs || $FLASH == ext4 ]] || { echo "bench/run.sh: --flash is tmpfs or ext4, not '$FLASH'" >&2; exit 2; }
[[ $FLASH == tmpfs || $SUITE == cache ]] || { echo "bench/run.sh: --flash applies to --suite cache only" >&2; exit 2; }
[[ "$MEM" =~ ^[0-9]+$ && "$MEM" -ge 512 ]] || { echo "bench/run.sh: bad --mem '$MEM' (MiB, >= 512)" >&2; exit 2; }
[[ "$BOOT_RTT" =~ ^[0-9]+$ && "$BOOT_RTT" -le 10000 ]] || { echo "bench/run.sh: bad --boot-rtt '$BOOT_RTT' (milliseconds, 0-10000)" >&2; exit 2; }
for k in $KERNELS; do [[ $k == 7 || $k == 6.12 ]] || { echo "bench/run.sh: --kernel takes 7 and/or 6.12, not '$k'" >&2; exit 2; }; done
if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-1} RUNTIME=${RUNTIME:-3} RAMP=${RAMP:-1} WRUNTIME=${WRUNTIME:-3} WARMUP=1 WAITB=45 RETRYB=4
else
    REPS=${REPS:-3} RUNTIME=${RUNTIME:-10} RAMP=${RAMP:-2} WRUNTIME=${WRUNTIME:-10} WARMUP=2 WAITB=150 RETRYB=8
fi
# The flashcache smoke test runs whatever the host does: no waiting, no repeats.
[[ $SUITE == flashcache && $QUICK == 1 ]] && WAITB=0 RETRYB=0
for v in REPS RUNTIME RAMP WRUNTIME; do
    [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || { echo "bench/run.sh: bad ${v,,} '${!v}'" >&2; exit 2; }
done
[[ $RUNTIME -ge 2 ]] || { echo "bench/run.sh: --runtime must be >= 2" >&2; exit 2; }

source "$ROOT/vm/lib.sh"
blog() { echo "[bench] $*" >&2; }

# ---- tools: gnuplot for the chart, python3 for the report (both host side) ----------------------
vm_ensure gnuplot:gnuplot-nox python3:python3 || blog "WARNING: cannot install gnuplot-nox; no chart"
PY=$(command -v python3)
NBDKIT_DIR=/usr/lib/x86_64-linux-gnu/nbdkit
[[ $SUITE == http && $NBD == 1 ]] && vm_ensure nbdkit:nbdkit /usr/sbin/nbd-client:nbd-client "$NBDKIT_DIR/plugins/nbdkit-curl-plugin.so:nbdkit"

# ---- build ------------------------------------------------------------------------------------------
# What is measured: the tree's revision when it is built here (taken before the build).
if [[ -n "$LABEL" ]]; then
    GIT_REV="$LABEL"
else
    GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -n "$(git status --porcelain -- Sources Package.swift 2>/dev/null)" ]] && GIT_REV+="+dirty"
    [[ -z "$BIN" && $BUILD == 1 ]] || GIT_REV="binary $(basename "${BIN:-ublk-http}") of $(date -r "${BIN:-$ROOT/.build-static/release/ublk-http}" '+%m-%d %H:%M' 2>/dev/null), tree $GIT_REV"
fi
if [[ -z "$BIN" ]]; then
    if [[ $BUILD == 1 ]]; then
        blog "building the static binary (tests/build-static.sh)"
        BIN="$(tests/build-static.sh)"
    else
        BIN="$ROOT/.build-static/release/ublk-http"
    fi
fi
[[ -x "$BIN" ]] || { echo "bench/run.sh: no binary $BIN" >&2; exit 1; }
KUBLK_BIN=""
if [[ " $DEVICES " == *" kublk"* || " $DEVICES " == *"-kublk"* ]]; then
    KUBLK_BIN=$(bench/kublk.sh) || { echo "bench/run.sh: bench/kublk.sh failed" >&2; exit 1; }
fi
mkdir -p "$VM_CACHE"

# ---- idle host, lock ----------------------------------------------------------------------------------
# host_busy: busy ticks (USER_HZ) of all host CPUs so far.
host_busy() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
other_qemu() { pgrep -x -c qemu-system-x86 2>/dev/null || true; }
# wait_idle MIN: waits up to MIN minutes for the host to be idle.
wait_idle() {
    local deadline=$((SECONDS + $1 * 60)) b0 b1 busy q
    while :; do
        b0=$(host_busy); sleep 5; b1=$(host_busy)
        busy=$(( (b1 - b0) / 5 )) q=$(other_qemu)
        [[ $busy -lt 20 && ${q:-0} -eq 0 ]] && { blog "host idle (${busy}% of a core busy, no other qemu)"; return 0; }
        [[ $SECONDS -ge $deadline ]] && { blog "WARNING: the host is still busy (${busy}% of a core, ${q:-0} qemu); running anyway"; return 0; }
        blog "host busy (${busy}% of a core, ${q:-0} other qemu-system), waiting"
        sleep 25
    done
}
[[ $WAIT_IDLE -gt 0 ]] && wait_idle "$WAIT_IDLE"
# One benchmark at a time (two would disturb each other).  The lock file is
# only kept open while this run holds the lock.
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

# ---- one boot per kernel -------------------------------------------------------------------------
# boot KERNEL DIR: packs the initramfs for KERNEL, boots, runs the suite, reports into DIR.
boot() {
    local K=$1 D=$2 KVER INITRD STAMP EXTRA=() RUNF=()
    export UBLK_VM_KERNEL=$K
    "$VM_DIR/kernel.sh" "$K" >/dev/null
    KVER="$(cat "$("$VM_DIR/kernel.sh" "$K")/version")"
    # Uncompressed (boots faster under TCG); one per suite's tools and kernel.
    local kind=base
    if [[ $SUITE == http && $NBD == 1 ]]; then
        kind=nbd
        EXTRA+=(--bin "$(command -v nbdkit):/usr/bin/nbdkit" --bin /usr/sbin/nbd-client:/usr/sbin/nbd-client
                --bin "$NBDKIT_DIR/plugins/nbdkit-curl-plugin.so:$NBDKIT_DIR/plugins/nbdkit-curl-plugin.so"
                --bin "$NBDKIT_DIR/filters/nbdkit-cache-filter.so:$NBDKIT_DIR/filters/nbdkit-cache-filter.so")
    fi
    # The flashcache suite: dmsetup and make-bcache (bench/flashtools.sh), the
    # device-mapper targets and bcache; ldd finds libdevmapper in the extracted tree.
    local LDPATH=${LD_LIBRARY_PATH:-}
    if [[ $SUITE == flashcache ]]; then
        kind=flashcache
        local FT; FT=$(bench/flashtools.sh) || { blog "bench/flashtools.sh failed"; return 1; }
        EXTRA+=(--bin "$FT/sbin/dmsetup:/usr/sbin/dmsetup" --bin "$FT/usr/sbin/make-bcache:/usr/sbin/make-bcache")
        for m in dm_mod dm_delay dm_cache dm_cache_smq dm_writecache dm_bufio dm_persistent_data dm_bio_prison bcache; do EXTRA+=(--module "$m"); done
        LDPATH="$FT/lib/x86_64-linux-gnu${LDPATH:+:$LDPATH}"
    fi
    # tc and netem: the http suite's boot and wan cases give nginx a round
    # trip, its mirrors case one mirror more (prio and u32 pick its port);
    # veritysetup: its verity case makes the image's hash tree in the guest.
    EXTRA+=(--bin /usr/sbin/tc:/usr/sbin/tc --module sch_netem --module sch_prio --module cls_u32)
    [[ $SUITE == http ]] && EXTRA+=(--bin /usr/sbin/veritysetup:/usr/sbin/veritysetup)
    INITRD="$VM_CACHE/initramfs-bench-$kind-$KVER.cpio"
    # Repacked when the binary (path, size, mtime), the kernel, anything under vm/ or the extras changed.
    STAMP="$(realpath "$BIN") $(stat -c '%s %Y' "$BIN") ${EXTRA[*]}"
    if [[ ! -f "$INITRD" || "$(cat "$INITRD.bin" 2>/dev/null)" != "$STAMP" || "$(cat "$INITRD.kver" 2>/dev/null)" != "$KVER" ]] \
       || [[ -n "$(find "$VM_DIR" -type f -newer "$INITRD" -print -quit)" ]]; then
        blog "packing $INITRD with $BIN"
        rm -f "$INITRD.bin"
        LD_LIBRARY_PATH="$LDPATH" vm/initramfs.sh "$INITRD" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq "${EXTRA[@]}" >/dev/null
        echo "$STAMP" > "$INITRD.bin"
    fi
    # Per run: the http suite's guest script and kublk (static) with its versions.
    RUNF=(--file "$ROOT/bench/guest-http.sh:/opt/bench/guest-http.sh" --file "$ROOT/bench/guest-flashcache.sh:/opt/bench/guest-flashcache.sh")
    # The http suite's wan case serves https: a self-signed certificate for 127.0.0.1, made once.
    if [[ $SUITE == http ]]; then
        local TLS="$VM_CACHE/bench-tls"
        if [[ ! -s "$TLS/cert.pem" ]]; then
            mkdir -p "$TLS"
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj /CN=127.0.0.1 \
                -addext subjectAltName=IP:127.0.0.1 -keyout "$TLS/key.pem" -out "$TLS/cert.pem" 2>/dev/null \
                || { blog "openssl could not make the wan case's certificate"; return 1; }
        fi
        RUNF+=(--file "$TLS/cert.pem:/opt/bench/tls/cert.pem" --file "$TLS/key.pem:/opt/bench/tls/key.pem")
    fi
    if [[ -n "$KUBLK_BIN" ]]; then
        RUNF+=(--bin "$KUBLK_BIN:/usr/local/bin/kublk" --file "$(dirname "$KUBLK_BIN")/versions:/etc/kublk-version")
    fi
    mkdir -p "$D"
    local ncase ndev TIMEOUT
    if [[ $SUITE == flashcache ]]; then
        # Every run sets its device up afresh and warms or scans it first; plus the media (filling the slow disk).
        # The smoke test (--quick) runs every case on one device and one case on each other device.
        ncase=$(wc -w <<<"$CASES") ndev=$(wc -w <<<"$DEVICES")
        [[ $QUICK == 1 ]] && ndev=$(( (ncase + ndev - 1 + ncase - 1) / ncase ))
        TIMEOUT=$(( 600 + WAITB + (REPS * ncase * ndev + RETRYB) * (RUNTIME + RAMP + 75) ))
    elif [[ $SUITE == http ]]; then
        # Plus, per rep, the cases not in the default list: fleet, wan, mirrors.
        local more=0
        [[ " $CASES " == *" fleet "* ]] && more=$((more + 400))
        [[ " $CASES " == *" wan "* ]] && more=$((more + 300))
        [[ " $CASES " == *" mirrors "* ]] && more=$((more + 120))
        TIMEOUT=$(( 420 + WAITB + REPS * (100 + 2 * RUNTIME + 6 * (WRUNTIME + RAMP + 3) + more) ))
    else
        ncase=$(wc -w <<<"${CASES:-x x x x}") ndev=$(wc -w <<<"${DEVICES:-x x x}")
        # Plus WAITB s of waiting for a quiet host and RETRYB repeats of disturbed runs at most (guest.sh).
        # Plus a minute per device for its setup (the cache devices copy and read the image).
        TIMEOUT=$(( 300 + WAITB + 60 * ndev + (REPS * ncase * ndev + RETRYB) * (RUNTIME + RAMP + 10) ))
    fi
    local HOST_BEFORE HOST_AFTER
    HOST_BEFORE="$(cat /proc/loadavg)"
    top -b -n1 -w 200 2>/dev/null | head -n 15 > "$D/bench-host-top-before.txt" || true
    local ENVS=(--env "BENCH_SUITE=$SUITE" --env "BENCH_REPS=$REPS" --env "BENCH_RUNTIME=$RUNTIME" --env "BENCH_RAMP=$RAMP"
          --env "BENCH_SCHED=$SCHED" --env "BENCH_WARMUP=$WARMUP" --env "BENCH_WQ_PIN=$WQ_PIN"
          --env "BENCH_WAIT_BUDGET=$WAITB" --env "BENCH_RETRY_BUDGET=$RETRYB" --env "BENCH_ALTERNATE=$ALTERNATE" --env "BENCH_FLASH=$FLASH"
          --env "BENCH_WARM_RUNTIME=$WRUNTIME" --env "BENCH_NBD=$NBD")
    [[ -n "$CASES" ]] && ENVS+=(--env "BENCH_CASES=$CASES")
    [[ $SUITE == http ]] && ENVS+=(--env "BENCH_BOOT_RTT_MS=$BOOT_RTT")
    # The quick flashcache run: an eighth of the sizes, no waiting for bcache's accounting timer.
    [[ $SUITE == flashcache && $QUICK == 1 ]] && ENVS+=(--env BENCH_FC_SLOW_MB=128 --env BENCH_FC_CACHE_MB=32 --env BENCH_FC_SETTLE=0 --env BENCH_FC_PLAN=smoke)
    [[ -n "$DEVICES" && $SUITE != http ]] && ENVS+=(--env "BENCH_DEVICES=$DEVICES")
    blog "booting the VM (kernel $KVER, suite $SUITE): $REPS rep(s) x ${CASES:-all cases} x ${DEVICES:-all devices}, ${RUNTIME}s + ${RAMP}s ramp per run (timeout ${TIMEOUT}s); host load $HOST_BEFORE"
    # Disturbance check: host CPU time used by processes other than this run (the
    # VM's qemu included, through `times`) while the VM runs.
    # `times` must run in this shell (a subshell starts with zero children's times).
    children_ticks() { awk 'END { n = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] } print int(n * 100) }' "$D/.times"; }
    local SOCK="/tmp/ublk-bench-hostmon.$$.sock" B0 C0 B1 C1 T0 ELAPSED OTHER VRC=1 attempt
    times > "$D/.times"; B0=$(host_busy) C0=$(children_ticks)
    T0=$SECONDS
    set +e
    for attempt in 1 2 3; do
        # hostmon.py passes the console through, times the guest's @@START/@@RESULT
        # lines, samples the host CPU used by other processes meanwhile and answers
        # the guest on a second serial port (its /dev/ttyS1, a unix socket here).
        rm -f "$SOCK"
        UBLK_VM_QEMU_ARGS="${UBLK_VM_QEMU_ARGS:-} -chardev socket,id=hostmon,path=$SOCK,server=on,wait=off -device isa-serial,chardev=hostmon" \
        vm/run.sh --initrd "$INITRD" --mem "$MEM" --smp 2 --timeout "$TIMEOUT" --log "$D/bench-console.log" \
            "${RUNF[@]}" "${ENVS[@]}" --env BENCH_HOSTCHAN=/dev/ttyS1 bench/guest.sh \
            | "$PY" "$ROOT/bench/hostmon.py" --root $$ --out "$D/bench-hostmon.json" --chan "$SOCK"
        VRC=${PIPESTATUS[0]}
        # A guest that died before the script started (TCG occasionally oopses at
        # boot) is booted again.
        [[ $VRC != 0 ]] && ! grep -aq '@@META' "$D/bench-console.log" 2>/dev/null || break
        blog "the guest died before the benchmark started (status $VRC); booting again"
    done
    set -e
    rm -f "$SOCK"
    ELAPSED=$((SECONDS - T0))
    times > "$D/.times"; B1=$(host_busy) C1=$(children_ticks); rm -f "$D/.times"
    OTHER=$(awk -v b=$((B1 - B0)) -v c=$((C1 - C0)) -v t="$ELAPSED" 'BEGIN { o = (b - c) / (t > 0 ? t : 1); if (o < 0) o = 0; printf "%.0f", o }')
    blog "host CPU used by other processes during the run: ${OTHER}% of one core (the VM uses ~200%)"
    [[ $OTHER -le 15 ]] || blog "WARNING: the host was busy with other work (${OTHER}% of a core): the numbers are disturbed"
    HOST_AFTER="$(cat /proc/loadavg)"
    top -b -n1 -w 200 2>/dev/null | head -n 15 > "$D/bench-host-top-after.txt" || true
    [[ $VRC == 0 ]] || blog "WARNING: the VM run ended with status $VRC"
    [[ -f "$D/bench-console.log" ]] || { blog "no console log"; return 1; }
    local REPORT=report.py
    [[ $SUITE == flashcache ]] && REPORT=report_flashcache.py
    "$PY" "$ROOT/bench/$REPORT" "$D" --host-load-before "$HOST_BEFORE" --host-load-after "$HOST_AFTER" \
        --elapsed "$ELAPSED" --host-other-cpu "$OTHER" --git "$GIT_REV" --vm-status "$VRC" --quick "$QUICK" \
        --kernel-flavour "$K"
}

RC=0
read -r -a KLIST <<<"$KERNELS"
DIRS=()
for K in "${KLIST[@]}"; do
    if [[ ${#KLIST[@]} -gt 1 ]]; then D="$OUT/$K"; else D="$OUT"; fi
    DIRS+=("$D")
    boot "$K" "$D" || RC=1
done
if [[ $SUITE == cache ]]; then
    "$PY" "$ROOT/bench/report.py" --goals "$OUT" "${DIRS[@]}" || RC=1
fi
exit $RC
