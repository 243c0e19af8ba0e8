#!/usr/bin/bash
# bench/guest.sh -- the guest side of bench/run.sh (runs inside the qemu VM as
# /test/script; see vm/run.sh), one library for every suite (BENCH_SUITE):
#   loop, cache  the device matrix below: sets up every device, then runs fio
#                for every (rep, case, device), interleaving the devices
#                within each rep;
#   http         bench/guest-http.sh (sourced from /opt/bench): the http
#                target's cold and warm cases, with this file's helpers.
# Machine-readable lines on the console for the host to collect:
#   @@META {json}@@            once: suite, settings, kernel, fio version
#   @@DEVICE {json}@@          per device: path, server pid, affinity, notes
#                              ({"refused": "..."} when the device cannot be
#                              set up on this kernel or binary)
#   @@START {case,device,rep}@@  when a run starts (the host times it)
#   @@RESULT {json}@@          per run (or {..., "error": "..."}, or
#                              {..., "refused": "..."} for a refused device)
#   @@DONE@@                   at the end
# Everything else is human-readable progress.
#
# Settings (environment, set by bench/run.sh through vm/run.sh --env):
#   BENCH_SUITE (loop)
#   BENCH_REPS (3)  BENCH_RUNTIME (10 s)  BENCH_RAMP (2 s)
#   BENCH_WARMUP (2 s of unrecorded 4k random reads per device before rep 1)
#   BENCH_CASES     (default: all cases below, in this order)
#   BENCH_DEVICES   (default: kloop ublk-loop ublk-null; run.sh passes the
#                   cache suite's list)
#   BENCH_FLASH (tmpfs)  where the flash side lives: tmpfs, or ext4: an ext4
#                   file system on a brd RAM disk (a real block device), for
#                   kloop's file (shared by ublk-loop and kublk) and the cache
#                   files (the cache target then uses its io_uring path, as
#                   on a real flash disk, not its in-memory mapping)
#   BENCH_KUBLK     the kernel selftests' kublk (bench/kublk.sh), for the
#                   kublk devices (/usr/local/bin/kublk)
#   BENCH_ALTERNATE (0)  1: every other rep runs the devices in reverse order,
#                   so that no device always follows the same one
#   BENCH_SCHED     I/O scheduler forced on every device ("none" by default;
#                   "keep" leaves the kernel's choice)
#   BENCH_FIO_CPU (0)  BENCH_SERVER_CPU (1)
#   Per run, besides fio's figures: the server's CPU (utime+stime of all its
#   threads) over the steady window, and its VmRSS/VmHWM right after the run;
#   report.py turns them into CPU per I/O.
#   BENCH_WQ_PIN (1)  confine the kernel's unbound workqueues (the loop
#                   driver's workers) to the server vCPU, like the server
#   BENCH_HOSTCHAN  a serial port to bench/hostmon.py on the host (/dev/ttyS1,
#                   set by run.sh): before each run the guest waits for the
#                   host to be quiet (at most BENCH_WAIT_BUDGET s in all, 150),
#                   after it asks how much CPU other host processes used, and
#                   repeats a run they disturbed (> BENCH_DISTURBED % of a
#                   core, 25; at most 2 repeats per run and BENCH_RETRY_BUDGET
#                   repeats in all, 8).  Without it runs are never repeated.
#
# Adding a case: write case_NAME (dashes in NAME become underscores) setting
#   CASE_ARGS  -- fio arguments (rw, bs, iodepth, ...)
#   CASE_DIR   -- read or write: which side of fio's JSON to report
#   CASE_DEVICES -- optional: the only devices the case runs on
# and add NAME to ALL_CASES.
# Adding a device: write dev_NAME_setup, which sets DEV_PATH (the block device),
#   DEV_PID (the userspace server's pid, or empty), DEV_RO=1 if the device
#   cannot take writes (write cases are then skipped on it), DEV_NOTE (free
#   text for the results) and may set DEV_EXTRA to a JSON object merged into
#   its @@DEVICE line, DEV_CASES (the only cases it runs) or DEV_REFUSED (a
#   one-line reason: the device is left out and the report says "refused");
#   and dev_NAME_teardown.  Add NAME to ALL_DEVICES.  Start
#   servers with `srv_taskset CMD...` so that they run on the server vCPU.
#   Optional: dev_NAME_after, run after each fio run on the device (outside the
#   measurement; write-back devices flush there, so that no run inherits the
#   previous one's backlog).
set -u -o pipefail

SUITE=${BENCH_SUITE:-loop}
UBLK=${UBLK:-/usr/local/bin/ublk-http}
KUBLK=${KUBLK:-/usr/local/bin/kublk}
LOSETUP=/usr/sbin/losetup
REPS=${BENCH_REPS:-3}
RUNTIME=${BENCH_RUNTIME:-10}
RAMP=${BENCH_RAMP:-2}
WARMUP=${BENCH_WARMUP:-2}
SCHED=${BENCH_SCHED:-none}
FIO_CPU=${BENCH_FIO_CPU:-0}
SERVER_CPU=${BENCH_SERVER_CPU:-1}
WQ_PIN=${BENCH_WQ_PIN:-1}
HOSTCHAN=${BENCH_HOSTCHAN:-}
WAIT_BUDGET=${BENCH_WAIT_BUDGET:-150}
RETRY_BUDGET=${BENCH_RETRY_BUDGET:-8}
DISTURBED=${BENCH_DISTURBED:-25}
IMG=/tmp/bench.img
IMG_MB=256

ALL_CASES=(randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32 seqread-1m-qd8 randread-4k-qd32-2j)
ALL_DEVICES=(kloop ublk-loop ublk-null kublk-zc kublk ublk-cache-through ublk-cache-through-notrack ublk-cache-back ublk-cache-back-notrack ublk-cache-q1 ublk-cache-q2)
ALTERNATE=${BENCH_ALTERNATE:-0}
FLASH=${BENCH_FLASH:-tmpfs}
FLASH_DIR=/tmp
read -r -a CASES <<<"${BENCH_CASES:-randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32 seqread-1m-qd8}"
read -r -a DEVICES <<<"${BENCH_DEVICES:-kloop ublk-loop ublk-null}"

log() { echo "[bench] $*"; }
die() { echo "[bench] ERROR: $*"; exit 1; }
fn() { echo "${1//-/_}"; }   # a case or device name -> function name part

# ---- cases --------------------------------------------------------------------------------------
case_randread_4k_qd1()   { CASE_ARGS="--rw=randread --bs=4k --iodepth=1";   CASE_DIR=read; }
case_randread_4k_qd32()  { CASE_ARGS="--rw=randread --bs=4k --iodepth=32";  CASE_DIR=read; }
case_randwrite_4k_qd32() { CASE_ARGS="--rw=randwrite --bs=4k --iodepth=32"; CASE_DIR=write; }
case_seqread_1m_qd8()    { CASE_ARGS="--rw=read --bs=1M --iodepth=8";       CASE_DIR=read; }
# Two fio jobs on cache hits, one per vCPU (blk-mq sends each CPU's requests to
# one queue, so a -q 2 device gets requests on both): the -q 2 vs -q 1 case.
# Its servers are not pinned (CASE_SPREAD): each queue thread may run anywhere.
case_randread_4k_qd32_2j() { CASE_ARGS="--rw=randread --bs=4k --iodepth=32 --numjobs=2 --group_reporting"; CASE_DIR=read
                             CASE_DEVICES="kloop ublk-cache-q1 ublk-cache-q2"; CASE_SPREAD=1; }

# ---- devices ------------------------------------------------------------------------------------
srv_taskset() { taskset -c "$SERVER_CPU" "$@"; }

# fill_image: the backing file of the loop devices, on tmpfs, full of data
# (no holes, so every read copies real pages).
fill_image() {
    [[ -f $IMG ]] && return 0
    local t0=$SECONDS
    dd if=/dev/urandom of="$IMG" bs=1M count=$IMG_MB status=none || die "cannot fill $IMG"
    log "filled $IMG ($IMG_MB MiB of random data, $((SECONDS - t0)) s)"
}

# flash_setup: with BENCH_FLASH=ext4, an ext4 file system on a RAM disk
# (brd) at /mnt/flash, big enough for kloop's file and a cache per cache
# device.  brd rather than a virtio disk backed by a host file: a virtio
# disk's I/O runs in qemu threads on the host's 2 cores, beside the 2 vCPU
# threads, so every I/O would steal host CPU from the vCPUs (and hide from
# the host monitor, being the VM's own); brd is a block device inside the
# guest, the same on every kernel, with nothing outside the vCPUs.
flash_setup() {
    [[ $FLASH == ext4 ]] || return 0
    FLASH_DIR=/mnt/flash
    grep -q " /mnt/flash " /proc/mounts && return 0
    local d ncache=0 mb
    for d in "${DEVICES[@]}"; do [[ $d == ublk-cache-* ]] && ncache=$((ncache + 1)); done
    mb=$(( IMG_MB * (ncache + 1) + 256 ))
    kmod-load brd rd_nr=1 rd_size=$(( mb * 1024 )) || die "cannot load brd"
    mkdir -p /mnt/flash
    mkfs.ext4 -q -F /dev/ram0 && mount -t ext4 /dev/ram0 /mnt/flash || die "cannot make ext4 on /dev/ram0"
    FLASH_FILE=$FLASH_DIR/bench.img
    cp "$IMG" "$FLASH_FILE" || die "cannot copy $IMG to $FLASH_FILE"
    log "flash side: ext4 on /dev/ram0 ($mb MiB) at /mnt/flash, $FLASH_FILE"
}
FLASH_FILE=$IMG
# flash_file: the file kloop, ublk-loop and kublk serve (on the flash side).
flash_file() { fill_image; flash_setup; }

# (a) the kernel loop driver with direct I/O: the baseline.
dev_kloop_setup() {
    flash_file
    local file=$FLASH_FILE
    kmod-load loop || die "cannot load the loop module"
    DEV_PATH=$("$LOSETUP" --direct-io=on -f --show "$file") || die "losetup failed"
    local dio
    dio=$(cat "/sys/block/$(basename "$DEV_PATH")/loop/dio" 2>/dev/null || echo "?")
    DEV_PID=""
    DEV_NOTE="kernel loop, losetup --direct-io=on, dio=$dio, file on $FLASH"
    DEV_EXTRA="{\"dio\":\"$dio\"}"
}
dev_kloop_teardown() { "$LOSETUP" -d "$DEV_PATH"; }

# ublk_add ARGS...: `ublk-http add` on the server vCPU; sets DEV_PATH, DEV_PID,
# DEV_ID, or UBLK_ERR and returns 1.
ublk_add() {
    local out
    out=$(srv_taskset timeout 60 "$UBLK" add "$@" 2>&1) || { UBLK_ERR=$out; return 1; }
    DEV_PATH=$(jq -r .block_device <<<"$out")
    DEV_PID=$(jq -r .pid <<<"$out")
    DEV_ID=$(jq -r .dev_id <<<"$out")
    DEV_ADD_JSON=$out
}
# list_extra: the device's target options and data path (`list` JSON) for DEV_EXTRA.
list_extra() { "$UBLK" list -n "$DEV_ID" | jq -c '.[0] | (.target_options // {}) + {data_path: (.data_path // .target_options.data_path // null), queues: .queues}'; }

# (b) ublk-http's loop target over the same file (O_DIRECT, else --buffered).
dev_ublk_loop_setup() {
    flash_file
    if ublk_add -t loop -f "$FLASH_FILE"; then
        DEV_NOTE="ublk-http loop, O_DIRECT, file on $FLASH"
    else
        local err=$UBLK_ERR
        ublk_add -t loop -f "$FLASH_FILE" --buffered || die "ublk-http add -t loop failed: $err / $UBLK_ERR"
        DEV_NOTE="ublk-http loop, --buffered (O_DIRECT refused: $err), file on $FLASH"
        log "WARNING: $DEV_NOTE"
    fi
    DEV_EXTRA=$(list_extra)
    local dp; dp=$(jq -r '.data_path // empty' <<<"$DEV_EXTRA"); [[ -n $dp ]] && DEV_NOTE+=", data path $dp"
}

# (b') the kernel selftests' kublk loop target over the same file, one queue
# (-q 1, like ublk-http), with auto buffer registration (--auto_zc: zero
# copy, 6.16+) or its copy path.  kublk pins its queue threads to the
# queue's CPU mask itself: they are moved to the server vCPU afterwards.
kublk_add() { # NAME ARGS...
    local out id pid
    [[ -x $KUBLK ]] || { DEV_REFUSED="no kublk binary in the guest (bench/kublk.sh)"; return 0; }
    flash_file
    if ! out=$(srv_taskset timeout 60 "$KUBLK" add -t loop -q 1 "${@:2}" "$FLASH_FILE" 2>&1); then
        DEV_REFUSED="kublk add -t loop -q 1 ${*:2} refused: $(tail -n 2 <<<"$out" | tr '\n"' ' \047')"
        return 0
    fi
    id=$(sed -n 's/.*dev id \([0-9]*\):.*/\1/p' <<<"$out" | head -n 1)
    pid=$(sed -n 's/.*daemon pid \([0-9]*\).*/\1/p' <<<"$out" | head -n 1)
    if [[ -z $pid && -n $id ]]; then
        pid=$("$KUBLK" list -n "$id" 2>&1 | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p' | head -n 1)
    fi
    [[ -n $id && -n $pid ]] || die "kublk add: no dev id / daemon pid in: $out"
    # A driver without auto buffer registration (6.12) drops the flag without
    # an error and kublk then runs its copy path: refused, not measured as zero copy.
    local flags
    flags=$("$KUBLK" list -n "$id" 2>&1 | sed -n 's/.* flags \(0x[0-9a-f]*\).*/\1/p' | head -n 1)
    if [[ " ${*:2} " == *" --auto_zc "* && $(( ${flags:-0} & (1 << 11) )) == 0 ]]; then
        timeout 60 "$KUBLK" del -n "$id" >/dev/null 2>&1
        DEV_REFUSED="kublk --auto_zc: the driver dropped UBLK_F_AUTO_BUF_REG (device flags ${flags:-?}); kublk would run its copy path"
        return 0
    fi
    taskset -a -cp "$SERVER_CPU" "$pid" >/dev/null || log "WARNING: cannot pin kublk $pid"
    DEV_PATH=/dev/ublkb$id DEV_PID=$pid DEV_ID=$id
    local i; for i in $(seq 50); do [[ -b $DEV_PATH ]] && break; sleep 0.1; done
    DEV_NOTE="kublk loop -q 1 ${*:2} (selftests of $(cat /etc/kublk-version 2>/dev/null | head -n 1)), file on $FLASH"
    DEV_EXTRA=$(jq -cn --arg a "${*:2}" --arg f "$flags" '{kublk_args: $a, ublk_flags: $f}')
    DEV_NOTE+=", device flags $flags"
}
dev_kublk_zc_setup()    { kublk_add kublk-zc --auto_zc; }
dev_kublk_zc_teardown() { timeout 60 "$KUBLK" del -n "$DEV_ID"; }
dev_kublk_setup()       { kublk_add kublk; }
dev_kublk_teardown()    { timeout 60 "$KUBLK" del -n "$DEV_ID"; }
dev_ublk_loop_teardown() { timeout 60 "$UBLK" del -n "$DEV_ID"; }

# (c) ublk-http's null target.
dev_ublk_null_setup() {
    ublk_add -t null --size ${IMG_MB}M || die "ublk-http add -t null failed: $UBLK_ERR"
    DEV_NOTE="ublk-http null"
    DEV_EXTRA="{}"
}
dev_ublk_null_teardown() { timeout 60 "$UBLK" del -n "$DEV_ID"; }

# (d) ublk-http's cache target.  The flash side (cache file, bitmaps)
# is where the loop devices' file is (ext4 on brd, or tmpfs), so the
# comparison with kloop is "the same fast medium, with and without the cache
# engine"; the slow side
# (backing) is a tmpfs copy of the image too, so that write-through is
# measured against memory speed, not against a slow disk it would wait for.
# The cache is filled by one full read before the runs (reads are hits).
# MODE through|back, TRACK 1|0 (--no-dirty-tracking).
cache_setup() {
    local name=$1 mode=$2 track=$3 queues=${4:-} t0=$SECONDS
    fill_image
    flash_setup
    local dir=/tmp/$name cdir=$FLASH_DIR/$name-cache
    rm -rf "$dir" "$cdir" && mkdir -p "$dir" "$cdir"
    cp "$IMG" "$dir/backing.img" || die "cannot copy $IMG (is the guest's memory big enough? run.sh --mem)"
    local args=(-t cache --backing "$dir/backing.img" --cache "$cdir/cache" --bitmap "$cdir/bitmap" --write-mode "$mode")
    [[ $track == 1 ]] || args+=(--no-dirty-tracking)
    if [[ -n $queues ]]; then
        args+=(-q "$queues")
        # A binary without multiple queues for cache refuses -q 2: reported, not fatal.
        ublk_add "${args[@]}" || { DEV_REFUSED="ublk-http add -t cache -q $queues refused: $(tail -n 1 <<<"$UBLK_ERR" | tr '"' "'")"; rm -rf "$dir" "$cdir"; return 0; }
    else
        ublk_add "${args[@]}" || die "ublk-http add ${args[*]} failed: $UBLK_ERR"
    fi
    taskset -c "$FIO_CPU" dd if="$DEV_PATH" of=/dev/null bs=1M iflag=direct status=none || die "cannot read $DEV_PATH"
    # The -q N devices of the two-job case: every thread may run on every vCPU.
    [[ -n $queues ]] && taskset -a -cp "0-$(($(nproc --all) - 1))" "$DEV_PID" >/dev/null
    DEV_NOTE="ublk-http cache${queues:+ -q $queues (not pinned)}, write-$mode, dirty tracking $([[ $track == 1 ]] && echo on || echo off), cache on $FLASH, filled ($((SECONDS - t0)) s)"
    DEV_EXTRA=$(list_extra)
    local dp; dp=$(jq -r '.data_path // empty' <<<"$DEV_EXTRA"); [[ -n $dp ]] && DEV_NOTE+=", data path $dp"
}
cache_teardown() { timeout 60 "$UBLK" del -n "$DEV_ID"; rm -rf "/tmp/$1" "$FLASH_DIR/$1-cache"; }
# A write-back device's dirty pages are written back after each run.
cache_flush() {
    local t0=$EPOCHREALTIME
    timeout 300 "$UBLK" flush -n "$DEV_ID" >/dev/null || log "flush of ublk$DEV_ID failed"
    log "flushed ublk$DEV_ID (write-back backlog): $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
}
dev_ublk_cache_through_setup()          { cache_setup ublk-cache-through through 1; }
dev_ublk_cache_through_teardown()       { cache_teardown ublk-cache-through; }
dev_ublk_cache_through_notrack_setup()  { cache_setup ublk-cache-through-notrack through 0; }
dev_ublk_cache_through_notrack_teardown() { cache_teardown ublk-cache-through-notrack; }
dev_ublk_cache_back_setup()             { cache_setup ublk-cache-back back 1; }
dev_ublk_cache_back_teardown()          { cache_teardown ublk-cache-back; }
dev_ublk_cache_back_after()             { cache_flush; }
dev_ublk_cache_back_notrack_setup()     { cache_setup ublk-cache-back-notrack back 0; }
dev_ublk_cache_back_notrack_teardown()  { cache_teardown ublk-cache-back-notrack; }
dev_ublk_cache_back_notrack_after()     { cache_flush; }
# -q 2 on cache hits, against ublk-cache-through (-q 1), with 2 fio jobs.
dev_ublk_cache_q1_setup()               { cache_setup ublk-cache-q1 through 1 1; DEV_CASES="randread-4k-qd32-2j"; }
dev_ublk_cache_q1_teardown()            { cache_teardown ublk-cache-q1; }
dev_ublk_cache_q2_setup()               { cache_setup ublk-cache-q2 through 1 2; DEV_CASES="randread-4k-qd32-2j"; }
dev_ublk_cache_q2_teardown()            { cache_teardown ublk-cache-q2; }

# ---- measurement helpers ------------------------------------------------------------------------
# affinity PID: the affinity lists of the threads of PID, de-duplicated ("1").
affinity() {
    local t
    for t in /proc/"$1"/task/*; do taskset -cp "${t##*/}" 2>/dev/null | sed 's/.*: //'; done | sort -u | paste -sd' '
}

# snap PREFIX PID: a fork-free snapshot (bash builtins only, so that sampling
# does not disturb the run) into PREFIX_t (µs), PREFIX_c0b/_c0t (busy/total
# ticks of the fio vCPU), PREFIX_c1b/_c1t (of the server vCPU), PREFIX_srv
# (utime+stime ticks of the server process, all threads, dead ones included;
# PREFIX_su / PREFIX_ss: utime / stime apart),
# PREFIX_iowq (ns run by its io_uring io-wq workers, "iou-wrk-*", alive ones),
# PREFIX_iowqn (how many), PREFIX_iowqcpus (the CPUs they last ran on).
# Busy = all ticks but idle and iowait.
snap() {
    local p=$1 pid=${2:-} name u n sy idle iow rest t comm run f cpus=""
    local -i srv=0 iowq=0 iowqn=0 su=0 ss=0
    printf -v "${p}_t" '%s' "${EPOCHREALTIME/./}"
    while read -r name u n sy idle iow rest; do
        [[ $name == cpu[0-9]* ]] || continue
        local -a r=($rest)
        local -i tot=$((u + n + sy + idle + iow + r[0] + r[1] + r[2]))
        if [[ $name == "cpu$FIO_CPU" ]]; then printf -v "${p}_c0b" '%s' $((tot - idle - iow)); printf -v "${p}_c0t" '%s' $tot; fi
        if [[ $name == "cpu$SERVER_CPU" ]]; then printf -v "${p}_c1b" '%s' $((tot - idle - iow)); printf -v "${p}_c1t" '%s' $tot; fi
    done < /proc/stat
    if [[ -n $pid && -r /proc/$pid/stat ]]; then
        read -r -a f < "/proc/$pid/stat" 2>/dev/null && srv=$((f[13] + f[14])) su=${f[13]} ss=${f[14]}
        for t in /proc/"$pid"/task/*; do
            read -r comm < "$t/comm" 2>/dev/null || continue
            [[ $comm == iou-wrk* ]] || continue
            read -r run rest < "$t/schedstat" 2>/dev/null || continue
            read -r -a f < "$t/stat" 2>/dev/null || continue
            iowq+=run; iowqn+=1
            [[ " $cpus " == *" ${f[38]} "* ]] || cpus+="${cpus:+ }${f[38]}"
        done
    fi
    printf -v "${p}_srv" '%s' $srv
    printf -v "${p}_su" '%s' $su
    printf -v "${p}_ss" '%s' $ss
    printf -v "${p}_iowq" '%s' $iowq
    printf -v "${p}_iowqn" '%s' $iowqn
    printf -v "${p}_iowqcpus" '%s' "$cpus"
}
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b; else print "null" }'; }
# rss PID: "VmRSS VmHWM" of PID in KiB (bash builtins only), or "null null".
rss() {
    local k v rest r=null h=null
    if [[ -n $1 && -r /proc/$1/status ]]; then
        while read -r k v rest; do
            case $k in VmRSS:) r=$v ;; VmHWM:) h=$v ;; esac
        done < "/proc/$1/status"
    fi
    echo "$r $h"
}

# ---- the channel to the host (bench/hostmon.py) -----------------------------------------------
CHAN=0
# chan_ask LINE TIMEOUT: sends LINE, reads one reply line into CHAN_REPLY.  A
# lost reply would shift every later one, so the channel is given up then.
chan_ask() {
    [[ $CHAN == 1 ]] || return 1
    local reply
    printf '%s\n' "$1" >&7
    if ! IFS= read -r -t "$2" reply <&7; then
        log "host channel: no answer to '$1'; giving it up"
        CHAN=0
        return 1
    fi
    CHAN_REPLY=${reply%$'\r'}
}
chan_open() {
    [[ -n $HOSTCHAN && -c $HOSTCHAN ]] || return 0
    stty -F "$HOSTCHAN" raw -echo 2>/dev/null || return 0
    exec 7<>"$HOSTCHAN"
    local i reply
    for i in $(seq 1 20); do
        printf 'PING\n' >&7
        if IFS= read -r -t 1 reply <&7 && [[ ${reply%$'\r'} == PONG ]]; then
            while IFS= read -r -t 0.5 reply <&7; do :; done    # late PONGs
            CHAN=1
            log "host channel up ($HOSTCHAN)"
            return 0
        fi
    done
    log "host channel $HOSTCHAN does not answer; runs will not be repeated"
}
# host_quiet: waits (within the budget) for the host to be quiet.
host_quiet() {
    [[ $CHAN == 1 && $WAIT_BUDGET -gt 0 ]] || return 0
    local t0=$SECONDS max=$(( WAIT_BUDGET < 30 ? WAIT_BUDGET : 30 ))
    chan_ask "WAIT $max" $((max + 15)) || return 0
    WAIT_BUDGET=$((WAIT_BUDGET - (SECONDS - t0)))
    [[ $CHAN_REPLY == OK* ]] || log "host still busy (${CHAN_REPLY#* }% of a core) after ${max} s; running anyway (wait budget left: ${WAIT_BUDGET} s)"
}

# run_one REP CASE DEVICE ATTEMPT: one fio run; prints @@RESULT and sets
# RUN_DISTURBED=1 when the host says other processes disturbed it.
run_one() {
    local rep=$1 cname=$2 dname=$3 attempt=${4:-0}
    RUN_DISTURBED=0
    local path=${DEV_PATHS[$dname]} pid=${DEV_PIDS[$dname]}
    CASE_SPREAD=0
    "case_$(fn "$cname")"
    local out=/tmp/fio-$cname-$dname-$rep.json size
    # One fio job per vCPU (CASE_SPREAD), else every job on the fio vCPU.
    local cpus=$FIO_CPU spread=()
    [[ $CASE_SPREAD == 1 ]] && cpus="0-$(($(nproc --all) - 1))" spread=(--cpus_allowed="$cpus" --cpus_allowed_policy=split)
    size=$(blockdev --getsize64 "$path")
    echo "@@START {\"case\":\"$cname\",\"device\":\"$dname\",\"rep\":$rep,\"attempt\":$attempt}@@"
    # ublk-http's caching devices count writes and persistence cycles: the run's share of them.
    local st0="" st1="" persist=null
    [[ $dname == ublk-cache* ]] && st0=$("$UBLK" stats -n "${DEV_IDS[$dname]}" --json 2>/dev/null)
    chan_ask MARK 5 >/dev/null
    # shellcheck disable=SC2086
    taskset -c "$cpus" fio --name=bench --filename="$path" --ioengine=io_uring --direct=1 --numjobs=1 "${spread[@]}" \
        --size="$size" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0 --norandommap \
        --lat_percentiles=1 --percentile_list=50:99:99.9 --eta=never --disk_util=0 \
        --output-format=json --output="$out" \
        $CASE_ARGS >/tmp/fio.stderr 2>&1 &
    local fpid=$!
    # CPU usage over the steady part of the run (after the ramp, before the end).
    sleep "$WIN_START"
    snap A "$pid"
    sleep "$WIN_LEN"
    snap B "$pid"
    wait "$fpid"
    local rc=$?
    if [[ -n $st0 ]]; then
        sleep 1.1  # the server publishes its counters once a second
        st1=$("$UBLK" stats -n "${DEV_IDS[$dname]}" --json 2>/dev/null)
        persist=$(jq -cn --argjson a "$st0" --argjson b "${st1:-null}" 'if $b == null or $a.writes == null then null else
            {writes: ($b.writes - $a.writes), writes_held_for_intent: ($b.writes_held_for_intent - $a.writes_held_for_intent),
             intent_cycles: ($b.intent_cycles - $a.intent_cycles), full_cycles: ($b.full_cycles - $a.full_cycles)} end' 2>/dev/null || echo null)
    fi
    local rss_kb hwm_kb
    read -r rss_kb hwm_kb <<<"$(rss "$pid")"
    local hother=null hmax=null dist=null
    if chan_ask STAT 5; then
        hother=${CHAN_REPLY% *} hmax=${CHAN_REPLY#* }
        dist=$(awk -v o="$hother" -v t="$DISTURBED" 'BEGIN { print (o > t) ? "true" : "false" }')
        [[ $dist == true ]] && RUN_DISTURBED=1
    fi
    local -i wall_us=$((B_t - A_t))
    local srv=null iowq=null
    if [[ -n $pid ]]; then
        srv=$(pct "$((B_srv - A_srv))" "$((wall_us / 10000))")          # USER_HZ = 100
        iowq=$(pct "$(( (B_iowq - A_iowq) / 1000 ))" "$wall_us")
    fi
    local meta
    meta=$(jq -cn --arg case "$cname" --arg device "$dname" --argjson rep "$rep" --arg dir "$CASE_DIR" \
        --arg args "$CASE_ARGS" --argjson srv "$srv" --argjson iowq "$iowq" --argjson iowqn "${B_iowqn:-0}" \
        --arg iowqcpus "$B_iowqcpus" --argjson win "$wall_us" --argjson attempt "$attempt" \
        --argjson hother "$hother" --argjson hmax "$hmax" --argjson dist "$dist" \
        --argjson rss "$rss_kb" --argjson hwm "$hwm_kb" --argjson persist "$persist" --argjson srvticks "$(( ${B_srv:-0} - ${A_srv:-0} ))" \
        --argjson c0 "$(pct "$((B_c0b - A_c0b))" "$((B_c0t - A_c0t))")" \
        --argjson c1 "$(pct "$((B_c1b - A_c1b))" "$((B_c1t - A_c1t))")" \
        '{case: $case, device: $device, rep: $rep, attempt: $attempt, dir: $dir, fio_args: $args,
          host_other_cpu_pct: $hother, host_other_cpu_max_pct: $hmax, disturbed: $dist,
          server_cpu_pct: $srv, server_iowq_cpu_pct: $iowq, server_iowq_threads: $iowqn,
          server_iowq_cpus: $iowqcpus, cpu_window_s: ($win / 1e6),
          server_cpu_ticks: (if $srv == null then null else $srvticks end), server_rss_kb: $rss, server_hwm_kb: $hwm,
          cpu_fio_busy_pct: $c0, cpu_server_busy_pct: $c1, persistence: $persist}')
    local res
    if [[ $rc -ne 0 ]] || ! res=$(jq -c --argjson m "$meta" '
            .jobs[0] as $j | $j[$m.dir] as $s |
            $m + {iops: $s.iops, bw_bytes: $s.bw_bytes, lat_mean_ns: $s.lat_ns.mean,
                  lat_p50_ns: $s.lat_ns.percentile["50.000000"], lat_p99_ns: $s.lat_ns.percentile["99.000000"],
                  lat_p999_ns: $s.lat_ns.percentile["99.900000"], ios: $s.total_ios, runtime_ms: $s.runtime,
                  fio_errors: $j.error, fio_usr_cpu: $j.usr_cpu, fio_sys_cpu: $j.sys_cpu}' "$out" 2>/dev/null); then
        local msg
        msg=$(tail -n 3 /tmp/fio.stderr | tr '\n"' ' \047')
        res=$(jq -c --arg e "fio exit $rc: $msg" '. + {error: $e}' <<<"$meta")
        log "rep $rep $cname $dname: FAILED ($msg)"
    else
        jq -r '"[bench] rep \(.rep) \(.case) \(.device): \(.iops|floor) IOPS, \(.bw_bytes/1048576*10|floor/10) MiB/s, mean \(.lat_mean_ns/1000|floor) us, p99 \(.lat_p99_ns/1000|floor) us; cpu0 \(.cpu_fio_busy_pct)% cpu1 \(.cpu_server_busy_pct)% busy, server \(.server_cpu_pct // "-")% (io-wq \(.server_iowq_cpu_pct // "-")%, \(.server_iowq_threads) thr on cpu [\(.server_iowq_cpus)]), RSS \(.server_rss_kb // "-") KiB; host others \(.host_other_cpu_pct // "?")%"' <<<"$res"
    fi
    echo "@@RESULT $res@@"
}

# ---- main -----------------------------------------------------------------------------------------
if [[ $SUITE == http ]]; then
    # The http suite: its own cases and devices, this file's helpers.
    source /opt/bench/guest-http.sh || die "cannot source /opt/bench/guest-http.sh"
    http_main
    exit $?
fi
if [[ $SUITE == flashcache ]]; then
    # The flashcache suite: the cache target vs the kernel's flash caches.
    source /opt/bench/guest-flashcache.sh || die "cannot source /opt/bench/guest-flashcache.sh"
    flashcache_main
    exit $?
fi
[[ $SUITE == loop || $SUITE == cache ]] || die "unknown suite $SUITE"
for c in "${CASES[@]}"; do declare -F "case_$(fn "$c")" >/dev/null || die "unknown case $c"; done
for d in "${DEVICES[@]}"; do declare -F "dev_$(fn "$d")_setup" >/dev/null || die "unknown device $d"; done
[[ $(nproc) -gt $SERVER_CPU && $(nproc) -gt $FIO_CPU ]] || die "needs at least $((SERVER_CPU + 1)) vCPUs (vm/run.sh --smp 2)"
# This script (and what it starts, unless told otherwise) stays off the server vCPU.
taskset -cp "$FIO_CPU" $$ >/dev/null
# The kernel loop driver works in unbound workqueue workers: keep them on the
# server vCPU too, so that every device's back end has vCPU 1 and fio vCPU 0.
WQ_MASK=/sys/devices/virtual/workqueue/cpumask
if [[ $WQ_PIN == 1 ]]; then
    printf '%x\n' $((1 << SERVER_CPU)) > "$WQ_MASK" || die "cannot restrict $WQ_MASK"
fi
WQ_CPUMASK=$(cat "$WQ_MASK" 2>/dev/null || echo "?")
# The CPU-usage window of each run: from 1 s after the ramp to 0.5 s before the end.
WIN_START=$((RAMP + 1))
WIN_LEN=$(awk -v t="$RUNTIME" 'BEGIN { w = t - 1.5; if (w < 0.5) w = 0.5; print w }')

jq -cn --arg kernel "$(uname -r)" --arg fio "$(fio --version)" --argjson reps "$REPS" --argjson runtime "$RUNTIME" \
    --argjson ramp "$RAMP" --argjson warmup "$WARMUP" --arg wqmask "$WQ_CPUMASK" --arg sched "$SCHED" --argjson fio_cpu "$FIO_CPU" --argjson server_cpu "$SERVER_CPU" \
    --argjson ncpu "$(nproc --all)" --argjson mem_mb "$(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo)" \
    --argjson image_mb "$IMG_MB" --arg cases "${CASES[*]}" --arg devices "${DEVICES[*]}" --argjson alternate "$ALTERNATE" --arg flash "$FLASH" \
    --arg suite "$SUITE" --arg kublk "$(cat /etc/kublk-version 2>/dev/null | paste -sd';')" \
    '{suite: $suite, kublk: $kublk, alternate: ($alternate == 1), flash: $flash, kernel: $kernel, fio: $fio, reps: $reps, runtime_s: $runtime, ramp_s: $ramp, warmup_s: $warmup, unbound_wq_cpumask: $wqmask, scheduler: $sched,
      fio_cpu: $fio_cpu, server_cpu: $server_cpu, guest_cpus: $ncpu, guest_mem_mb: $mem_mb, image_mb: $image_mb,
      cases: ($cases | split(" ")), devices: ($devices | split(" "))}' | sed 's/^/@@META /; s/$/@@/'

declare -A DEV_PATHS=() DEV_PIDS=() DEV_ROS=() DEV_IDS=() DEV_CASESS=()
SET_UP=()
# runs_on CASE DEVICE: whether CASE runs on DEVICE (CASE_DEVICES, DEV_CASES).
runs_on() {
    CASE_DEVICES=""
    "case_$(fn "$1")"
    [[ -z $CASE_DEVICES || " $CASE_DEVICES " == *" $2 "* ]] || return 1
    [[ -z ${DEV_CASESS[$2]:-} || " ${DEV_CASESS[$2]} " == *" $1 "* ]]
}
teardown_all() {
    local d
    for d in "${SET_UP[@]}"; do
        DEV_PATH=${DEV_PATHS[$d]} DEV_ID=${DEV_IDS[$d]}
        "dev_$(fn "$d")_teardown" >/dev/null 2>&1 || log "teardown of $d failed"
    done
    SET_UP=()
}
trap teardown_all EXIT

REFUSED=()
for d in "${DEVICES[@]}"; do
    DEV_PATH="" DEV_PID="" DEV_ID="" DEV_RO=0 DEV_NOTE="" DEV_EXTRA="{}" DEV_CASES="" DEV_REFUSED=""
    "dev_$(fn "$d")_setup"
    DEV_CASESS[$d]=$DEV_CASES
    if [[ -n $DEV_REFUSED ]]; then
        log "device $d: REFUSED: $DEV_REFUSED"
        jq -cn --arg name "$d" --arg r "$DEV_REFUSED" '{name: $name, refused: $r}' | sed 's/^/@@DEVICE /; s/$/@@/'
        for c in "${CASES[@]}"; do
            runs_on "$c" "$d" || continue
            jq -cn --arg c "$c" --arg d "$d" --arg r "$DEV_REFUSED" '{case: $c, device: $d, rep: 0, refused: $r}' | sed 's/^/@@RESULT /; s/$/@@/'
        done
        REFUSED+=("$d")
        continue
    fi
    [[ -b "$DEV_PATH" ]] || die "device $d: $DEV_PATH is not a block device"
    DEV_PATHS[$d]=$DEV_PATH DEV_PIDS[$d]=$DEV_PID DEV_ROS[$d]=$DEV_RO DEV_IDS[$d]=$DEV_ID
    SET_UP+=("$d")
    bdev=$(basename "$(realpath "$DEV_PATH")")
    if [[ "$SCHED" != keep && -w /sys/block/$bdev/queue/scheduler ]]; then
        echo "$SCHED" > "/sys/block/$bdev/queue/scheduler" || log "cannot set scheduler $SCHED on $bdev"
    fi
    sched=$(sed 's/.*\[\(.*\)\].*/\1/' "/sys/block/$bdev/queue/scheduler" 2>/dev/null)
    aff=""
    if [[ -n "$DEV_PID" ]]; then
        aff=$(affinity "$DEV_PID")
        # The two-job case's servers run unpinned (every vCPU), the others on the server vCPU.
        want=$SERVER_CPU; [[ $DEV_NOTE == *"(not pinned)"* ]] && want=$(taskset -cp 1 | sed 's/.*: //')  # init's: every vCPU
        [[ "$aff" == "$want" ]] || log "WARNING: server of $d (pid $DEV_PID) has affinity '$aff', not $want"
        log "$d: server pid $DEV_PID, $(taskset -p "$DEV_PID"), threads on CPUs: $aff"
    fi
    jq -cn --arg name "$d" --arg path "$DEV_PATH" --arg pid "$DEV_PID" --arg aff "$aff" --arg note "$DEV_NOTE" \
        --arg sched "$sched" --argjson ro "$DEV_RO" --argjson extra "$DEV_EXTRA" \
        --argjson size "$(blockdev --getsize64 "$DEV_PATH")" \
        '{name: $name, path: $path, server_pid: (if $pid == "" then null else ($pid | tonumber) end),
          server_affinity: (if $aff == "" then null else $aff end), note: $note, scheduler: $sched,
          read_only: ($ro == 1), size: $size, extra: $extra}' | sed 's/^/@@DEVICE /; s/$/@@/'
    log "device $d: $DEV_PATH ($DEV_NOTE, scheduler $sched)"
done
# The refused devices leave the run list.
if [[ ${#REFUSED[@]} -gt 0 ]]; then
    kept=(); for d in "${DEVICES[@]}"; do [[ " ${REFUSED[*]} " == *" $d "* ]] || kept+=("$d"); done
    DEVICES=("${kept[@]}")
fi

chan_open

# Warm-up, not recorded: the first I/O on a device pays for page faults in fio
# and the server, io-wq thread creation and the like.
if [[ $WARMUP -gt 0 ]]; then
    for d in "${DEVICES[@]}"; do
        taskset -c "$FIO_CPU" fio --name=warmup --filename="${DEV_PATHS[$d]}" --ioengine=io_uring --direct=1 \
            --rw=randread --bs=4k --iodepth=32 --time_based --runtime="$WARMUP" --eta=never --disk_util=0 --output=/dev/null >/dev/null 2>&1 \
            || log "warm-up on $d failed"
    done
    log "warm-up done (${WARMUP} s per device)"
fi

t_start=$SECONDS
for rep in $(seq 1 "$REPS"); do
    order=("${DEVICES[@]}")
    if [[ $ALTERNATE == 1 && $((rep % 2)) == 0 ]]; then
        order=(); for ((i = ${#DEVICES[@]} - 1; i >= 0; i--)); do order+=("${DEVICES[$i]}"); done
    fi
    for c in "${CASES[@]}"; do
        for d in "${order[@]}"; do
            runs_on "$c" "$d" || continue
            if [[ $CASE_DIR == write && ${DEV_ROS[$d]} == 1 ]]; then continue; fi
            if [[ -n "${DEV_PIDS[$d]}" ]] && ! kill -0 "${DEV_PIDS[$d]}" 2>/dev/null; then
                echo "@@RESULT {\"case\":\"$c\",\"device\":\"$d\",\"rep\":$rep,\"error\":\"server died\"}@@"
                continue
            fi
            attempt=0
            while :; do
                host_quiet
                run_one "$rep" "$c" "$d" "$attempt"
                if declare -F "dev_$(fn "$d")_after" >/dev/null; then
                    DEV_PATH=${DEV_PATHS[$d]} DEV_ID=${DEV_IDS[$d]}
                    "dev_$(fn "$d")_after"
                fi
                [[ $RUN_DISTURBED == 1 && $attempt -lt 2 && $RETRY_BUDGET -gt 0 ]] || break
                attempt=$((attempt + 1)) RETRY_BUDGET=$((RETRY_BUDGET - 1))
                log "rep $rep $c $d was disturbed by other host processes: repeating it (repeats left: $RETRY_BUDGET)"
            done
        done
    done
    log "rep $rep/$REPS done ($((SECONDS - t_start)) s)"
done

teardown_all
trap - EXIT
echo "@@DONE@@"
