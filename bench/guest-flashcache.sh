# bench/guest-flashcache.sh -- the flashcache suite (bench/run.sh --suite
# flashcache), sourced by bench/guest.sh in the guest (7.x kernel): the
# `cache` target of ublk-http against the kernel's own flash caches, in one
# boot, each over the same slow disk and the same flash capacity.
#
#   slow disk  dm-delay over a brd RAM disk (/dev/ram0, BENCH_FC_SLOW_MB,
#              1024): every read waits BENCH_FC_READ_MS (2) ms, every write
#              and flush BENCH_FC_WRITE_MS (4) ms: /dev/mapper/fc-slow,
#              filled with random data once.
#   flash      a second brd (/dev/ram1), discarded (all zeroes, memory given
#              back) before every device is set up, so that every device
#              starts cold: dm-linear slices of it are each cache's flash,
#              BENCH_FC_CACHE_MB (256) of data (+ 8 MiB of metadata for
#              dm-cache; bcache keeps its own in the same 256 MiB; ublk-http:
#              an ext4 file system of BENCH_FC_UBLKFS_MB, cache + 128, with
#              --cache-max-size of the cache size, as the cache target's help
#              asks for room beside it).
#   ceiling    a third brd (/dev/ram2) with ext4 and a file as big as the slow
#              disk (a copy of it), served by the kernel loop device
#              (losetup --direct-io=on) and by kublk --auto_zc.
#
# Devices (BENCH_DEVICES, names below), each set up afresh for every case
# (cold, comparable), torn down after it; cases interleave the devices:
#   slow              the slow disk alone (floor)
#   flash-kloop       kernel loop on the ceiling file (ceiling)
#   flash-kublk-zc    kublk loop --auto_zc on the ceiling file
#   ublk-wt, ublk-wb  ublk-http add -t cache --write-mode through / back
#   dmcache-wt, dmcache-wb  dm-cache, smq policy, 64 KiB blocks, writethrough / writeback
#   dmwritecache      dm-writecache (ssd mode, 4 KiB blocks)
#   bcache-wt, bcache-wb    bcache (make-bcache defaults), writethrough / writeback
#
# Cases (BENCH_CASES): see fc_case below.  Per run, besides fio's figures
# (IOPS, MB/s, clat p99, fdatasync p99): each cache's own hit and miss
# counters over the measured phase, the server's CPU (ublk-http, kublk;
# /proc/PID/stat) and the whole guest's busy and system CPU (/proc/stat),
# all over the measured phase, for CPU per I/O.
# shellcheck shell=bash

DMSETUP=/usr/sbin/dmsetup
MAKE_BCACHE=/usr/sbin/make-bcache
FC_SLOW_MB=${BENCH_FC_SLOW_MB:-1024}
FC_CACHE_MB=${BENCH_FC_CACHE_MB:-256}
FC_HOT_MB=${BENCH_FC_HOT_MB:-$((FC_CACHE_MB / 2))}
FC_META_MB=8
FC_UBLKFS_MB=${BENCH_FC_UBLKFS_MB:-$((FC_CACHE_MB + 128))}
FC_READ_MS=${BENCH_FC_READ_MS:-2}
FC_WRITE_MS=${BENCH_FC_WRITE_MS:-4}
FC_SETTLE=${BENCH_FC_SETTLE:-1}     # wait for bcache's accounting timer around measured phases
FC_ALL_DEVICES=(slow flash-kloop flash-kublk-zc ublk-wt ublk-wb dmcache-wt dmcache-wb dmwritecache bcache-wt bcache-wb)
FC_ALL_CASES=(hit-randread-4k-qd32 randwrite-4k-qd32 zipf-7030 scan fsync-write-4k-qd1 seqread-1m-qd8 seqwrite-1m-qd8)
FC_CEIL_FILE=/mnt/fc-ceil/flash.img
export DM_DISABLE_UDEV=1
dms() { "$DMSETUP" --noudevsync "$@"; }

# ---- the media ---------------------------------------------------------------------------------
fc_media() {
    local m
    for m in brd dm_mod dm_delay dm_cache dm_cache_smq dm_writecache bcache loop; do
        kmod-load "$m" $([[ $m == brd ]] && echo "rd_nr=3 rd_size=$(( (FC_SLOW_MB + 128) * 1024 ))") || die "cannot load module $m"
    done
    [[ -x $DMSETUP && -x $MAKE_BCACHE ]] || die "no $DMSETUP or $MAKE_BCACHE in the guest (bench/flashtools.sh)"
    local t0=$SECONDS
    dd if=/dev/urandom of=/dev/ram0 bs=1M count="$FC_SLOW_MB" oflag=direct status=none || die "cannot fill /dev/ram0"
    dms create fc-slow --table "0 $((FC_SLOW_MB * 2048)) delay /dev/ram0 0 $FC_READ_MS /dev/ram0 0 $FC_WRITE_MS" \
        || die "dmsetup create fc-slow (dm-delay) failed"
    [[ -b /dev/mapper/fc-slow ]] || die "no /dev/mapper/fc-slow after dmsetup create"
    mkdir -p /mnt/fc-ceil /mnt/fc-flash
    mkfs.ext4 -q -F /dev/ram2 && mount -t ext4 /dev/ram2 /mnt/fc-ceil || die "cannot make ext4 on /dev/ram2"
    dd if=/dev/ram0 of="$FC_CEIL_FILE" bs=1M count="$FC_SLOW_MB" status=none || die "cannot copy the slow disk to $FC_CEIL_FILE"
    log "media: slow disk /dev/mapper/fc-slow (dm-delay over /dev/ram0, $FC_SLOW_MB MiB, reads +$FC_READ_MS ms, writes/flushes +$FC_WRITE_MS ms), flash /dev/ram1 (caches of $FC_CACHE_MB MiB), ceiling $FC_CEIL_FILE on ext4 on /dev/ram2 ($((SECONDS - t0)) s)"
}
# fc_flash_reset: every byte of the flash back to zero (and its memory freed), no slices left.
fc_flash_reset() {
    local n
    for n in fc-dev fc-cdata fc-cmeta fc-ufs; do [[ -e /dev/mapper/$n ]] && dms remove "$n" >/dev/null 2>&1; done
    blkdiscard /dev/ram1 2>/dev/null || dd if=/dev/zero of=/dev/ram1 bs=1M count=$((FC_CACHE_MB + FC_UBLKFS_MB)) status=none
}
# fc_slice NAME OFFSET_MB SIZE_MB: a dm-linear slice of the flash.
fc_slice() { dms create "$1" --table "0 $(($3 * 2048)) linear /dev/ram1 $(($2 * 2048))" && [[ -b /dev/mapper/$1 ]]; }
fc_slow_sectors() { echo $((FC_SLOW_MB * 2048)); }

# ---- devices: fc_dev_NAME_setup sets DEV_PATH DEV_PID DEV_ID DEV_NOTE; fails -> die --------------
fc_dev_slow_setup() { DEV_PATH=/dev/mapper/fc-slow DEV_NOTE="slow disk alone (dm-delay ${FC_READ_MS}/${FC_WRITE_MS} ms)"; }
fc_dev_slow_teardown() { :; }
fc_dev_flash_kloop_setup() {
    DEV_PATH=$("$LOSETUP" --direct-io=on -f --show "$FC_CEIL_FILE") || die "losetup $FC_CEIL_FILE failed"
    DEV_NOTE="kernel loop --direct-io=on, dio=$(cat "/sys/block/$(basename "$DEV_PATH")/loop/dio" 2>/dev/null), file on ext4 on brd (flash alone)"
}
fc_dev_flash_kloop_teardown() { "$LOSETUP" -d "$DEV_PATH"; }
fc_dev_flash_kublk_zc_setup() {
    FLASH_FILE=$FC_CEIL_FILE DEV_REFUSED=""
    local FLASH="ext4 on brd ($FC_CEIL_FILE)"    # for kublk_add's note
    kublk_add kublk-zc --auto_zc
    [[ -z $DEV_REFUSED ]] || die "flash-kublk-zc: $DEV_REFUSED"
}
fc_dev_flash_kublk_zc_teardown() { timeout 60 "$KUBLK" del -n "$DEV_ID" >/dev/null; }

fc_ublk_setup() { # MODE
    fc_slice fc-ufs 0 "$FC_UBLKFS_MB" || die "cannot make the flash slice for ublk-http"
    mkfs.ext4 -q -F /dev/mapper/fc-ufs && mount -t ext4 /dev/mapper/fc-ufs /mnt/fc-flash || die "cannot make ext4 on the flash"
    rm -f /run/ublk-http/ublk*.log    # the server's own log, shown at teardown (no device is up now)
    ublk_add -t cache --backing /dev/mapper/fc-slow --cache /mnt/fc-flash/cache --bitmap /mnt/fc-flash/bitmap \
        --write-mode "$1" --cache-max-size "${FC_CACHE_MB}M" || die "ublk-http add -t cache --write-mode $1 failed: $UBLK_ERR"
    DEV_NOTE="ublk-http cache, write-$1, --cache-max-size ${FC_CACHE_MB}M, cache file on ext4 on a ${FC_UBLKFS_MB} MiB flash slice, data path $("$UBLK" list -n "$DEV_ID" | jq -r '.[0].data_path // .[0].target_options.cache_io // "?"')"
}
fc_ublk_teardown() {
    FC_UBLK_CACHE_KB=$(du -k /mnt/fc-flash/cache 2>/dev/null | cut -f1)
    local l=/run/ublk-http/ublk$DEV_ID.log
    [[ -s $l ]] && log "server log of $FC_CUR_DEV ($(wc -l < "$l") lines), the last ones: $(tail -n 4 "$l" | tr '\n' '|')"
    timeout 120 "$UBLK" del -n "$DEV_ID" >/dev/null 2>&1 || { log "ublk-http del -n $DEV_ID failed or timed out; killing $DEV_PID"; kill -9 "$DEV_PID" 2>/dev/null; sleep 1; timeout 60 "$UBLK" del -n "$DEV_ID" >/dev/null 2>&1; }
    umount /mnt/fc-flash || log "cannot unmount /mnt/fc-flash"
}
fc_dev_ublk_wt_setup() { fc_ublk_setup through; }
fc_dev_ublk_wt_teardown() { fc_ublk_teardown; }
fc_dev_ublk_wb_setup() { fc_ublk_setup back; }
fc_dev_ublk_wb_teardown() { fc_ublk_teardown; }

fc_dmcache_setup() { # writethrough|writeback
    fc_slice fc-cdata 0 "$FC_CACHE_MB" && fc_slice fc-cmeta "$FC_CACHE_MB" "$FC_META_MB" || die "cannot make the flash slices for dm-cache"
    dms create fc-dev --table "0 $(fc_slow_sectors) cache /dev/mapper/fc-cmeta /dev/mapper/fc-cdata /dev/mapper/fc-slow 128 1 $1 smq 0" \
        || die "dmsetup create (dm-cache $1) failed"
    DEV_PATH=/dev/mapper/fc-dev DEV_NOTE="dm-cache smq $1, 64 KiB blocks, $FC_CACHE_MB MiB data + $FC_META_MB MiB metadata"
}
fc_dev_dmcache_wt_setup() { fc_dmcache_setup writethrough; }
fc_dev_dmcache_wb_setup() { fc_dmcache_setup writeback; }
fc_dm_teardown() { timeout 120 "$DMSETUP" --noudevsync remove fc-dev || log "dmsetup remove fc-dev failed"; }
fc_dev_dmcache_wt_teardown() { fc_dm_teardown; }
fc_dev_dmcache_wb_teardown() { fc_dm_teardown; }
fc_dev_dmwritecache_setup() {
    fc_slice fc-cdata 0 "$FC_CACHE_MB" || die "cannot make the flash slice for dm-writecache"
    dms create fc-dev --table "0 $(fc_slow_sectors) writecache s /dev/mapper/fc-slow /dev/mapper/fc-cdata 4096 0" \
        || die "dmsetup create (dm-writecache) failed"
    DEV_PATH=/dev/mapper/fc-dev DEV_NOTE="dm-writecache ssd mode, 4 KiB blocks, $FC_CACHE_MB MiB (reads of unwritten blocks go to the slow disk: it caches writes only)"
}
fc_dev_dmwritecache_teardown() { fc_dm_teardown; }

# bcache: make-bcache over the slow disk (backing) and a flash slice (cache
# set) at once, registered by hand (no udev in the guest), then /dev/bcacheN.
FC_BC_SET=""
fc_bcache_dev() { local b; for b in /sys/block/bcache*; do [[ -e $b/bcache ]] && { basename "$b"; return 0; }; done; return 1; }
fc_bcache_setup() { # writethrough|writeback
    fc_slice fc-cdata 0 "$FC_CACHE_MB" || die "cannot make the flash slice for bcache"
    local out i b
    # The kernel wants 1024 buckets at least ("nbuckets is too small" at 512 KiB
    # buckets, make-bcache's default, below 512 MiB): buckets of cache/2048.
    wipefs -q -a /dev/mapper/fc-slow /dev/mapper/fc-cdata >/dev/null 2>&1
    out=$("$MAKE_BCACHE" --wipe-bcache --bucket "$((FC_CACHE_MB / 2))k" -B /dev/mapper/fc-slow -C /dev/mapper/fc-cdata 2>&1) || die "make-bcache failed: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
    FC_BC_SET=$(sed -n 's/^Set UUID:[[:space:]]*//p' <<<"$out" | head -n 1)
    echo /dev/mapper/fc-cdata > /sys/fs/bcache/register || die "bcache: registering the cache device failed: $(dmesg | grep bcache | tail -n 2 | tr '\n' ' ')"
    echo /dev/mapper/fc-slow > /sys/fs/bcache/register || die "bcache: registering the backing device failed: $(dmesg | grep bcache | tail -n 2 | tr '\n' ' ')"
    b=""; for i in $(seq 100); do b=$(fc_bcache_dev) && [[ -b /dev/$b ]] && break; sleep 0.1; done
    [[ -n $b && -b /dev/$b ]] || die "bcache: no /dev/bcacheN after registering (make-bcache said: $(tr '\n' ' ' <<<"$out"))"
    [[ -e /sys/block/$b/bcache/cache ]] || die "bcache: $b is not attached to the cache set $FC_BC_SET"
    echo "$1" > "/sys/block/$b/bcache/cache_mode" || die "bcache: cannot set cache_mode $1"
    DEV_PATH=/dev/$b
    DEV_NOTE="bcache $1 ($(sed 's/.*\[\(.*\)\].*/\1/' "/sys/block/$b/bcache/cache_mode")), make-bcache defaults but buckets of $((FC_CACHE_MB / 2)) KiB, sequential_cutoff $(cat "/sys/block/$b/bcache/sequential_cutoff"), $FC_CACHE_MB MiB cache set $FC_BC_SET"
}
fc_bcache_teardown() {
    local b=${DEV_PATH#/dev/} i
    echo 1 > "/sys/block/$b/bcache/stop" 2>/dev/null
    [[ -n $FC_BC_SET && -e /sys/fs/bcache/$FC_BC_SET ]] && echo 1 > "/sys/fs/bcache/$FC_BC_SET/stop" 2>/dev/null
    for i in $(seq 300); do [[ ! -e /sys/block/$b && ( -z $FC_BC_SET || ! -e /sys/fs/bcache/$FC_BC_SET ) ]] && break; sleep 0.1; done
    [[ ! -e /sys/block/$b ]] || log "bcache: $b still there after stop"
    # The backing superblock goes, so that no later device sees a bcache disk.
    wipefs -q -a /dev/mapper/fc-slow >/dev/null 2>&1
    FC_BC_SET=""
}
fc_dev_bcache_wt_setup() { fc_bcache_setup writethrough; }
fc_dev_bcache_wt_teardown() { fc_bcache_teardown; }
fc_dev_bcache_wb_setup() { fc_bcache_setup writeback; }
fc_dev_bcache_wb_teardown() { fc_bcache_teardown; }

# fc_counters DEVICE: {rh, rm, wh, wm} of the cache's own counters (null when
# it has none), plus its raw status.
fc_counters() {
    local d=$1 s
    case $d in
        ublk-*)
            s=$("$UBLK" stats -n "$DEV_ID" --json 2>/dev/null) || { echo null; return; }
            jq -c '{rh: .hits, rm: .misses, wh: null, wm: null, writes: .writes, pages: .pages_present, page_size: .page_size,
                    writes_held_for_intent: .writes_held_for_intent, intent_cycles: .intent_cycles, full_cycles: .full_cycles}' <<<"$s" ;;
        dmcache-*)
            s=$(dms status fc-dev 2>/dev/null) || { echo null; return; }
            # start len cache mdbs used/total cbs used/total rh rm wh wm demotions promotions dirty ...
            read -r -a f <<<"$s"
            jq -cn --argjson rh "${f[7]}" --argjson rm "${f[8]}" --argjson wh "${f[9]}" --argjson wm "${f[10]}" \
                --argjson dem "${f[11]}" --argjson pro "${f[12]}" --argjson dirty "${f[13]}" --arg used "${f[6]}" \
                '{rh: $rh, rm: $rm, wh: $wh, wm: $wm, demotions: $dem, promotions: $pro, dirty: $dirty, used: $used}' ;;
        dmwritecache)
            s=$(dms status fc-dev 2>/dev/null) || { echo null; return; }
            # start len writecache errors blocks free writeback reads read_hits writes write_hits_uncommitted write_hits_committed writes_around ...
            read -r -a f <<<"$s"
            [[ ${#f[@]} -ge 13 ]] || { jq -cn --arg s "$s" '{rh: null, rm: null, wh: null, wm: null, status: $s}'; return; }
            jq -cn --argjson r "${f[7]}" --argjson rh "${f[8]}" --argjson w "${f[9]}" --argjson whu "${f[10]}" --argjson whc "${f[11]}" \
                --argjson free "${f[5]}" --argjson wb "${f[6]}" --argjson around "${f[12]}" \
                '{rh: $rh, rm: ($r - $rh), wh: ($whu + $whc), wm: ($w - $whu - $whc), free_blocks: $free, writeback_blocks: $wb, writes_around: $around}' ;;
        bcache-*)
            local st=/sys/block/${DEV_PATH#/dev/}/bcache/stats_total
            [[ -r $st/cache_hits ]] || { echo null; return; }
            jq -cn --argjson h "$(cat "$st/cache_hits")" --argjson m "$(cat "$st/cache_misses")" \
                --argjson bh "$(cat "$st/cache_bypass_hits")" --argjson bm "$(cat "$st/cache_bypass_misses")" \
                --arg dirty "$(cat "/sys/block/${DEV_PATH#/dev/}/bcache/dirty_data" 2>/dev/null)" \
                '{rh: ($h + $bh), rm: ($m + $bm), wh: null, wm: null, hits: $h, misses: $m, bypass_hits: $bh, bypass_misses: $bm, dirty_data: $dirty}' ;;
        *) echo null ;;
    esac
}
# fc_has_counters DEVICE: whether the device is a cache with hit counters of its own.
fc_has_counters() { [[ $1 == ublk-* || $1 == dmcache-* || $1 == dmwritecache || $1 == bcache-* ]]; }
# fc_settle DEVICE: bcache folds its counters into stats_total on a timer
# (about every 13.6 s): wait for the next fold (at most 15 s) so that what
# came before is counted.  ublk-http publishes its counters once a second.
fc_settle() {
    case $1 in
        ublk-*) sleep 1.1 ;;
        bcache-*)
            [[ $FC_SETTLE == 1 ]] || return 0
            local st=/sys/block/${DEV_PATH#/dev/}/bcache/stats_total a b i
            a=$(cat "$st"/cache_{hits,misses,bypass_hits,bypass_misses} 2>/dev/null | tr '\n' ' ')
            for i in $(seq 60); do
                b=$(cat "$st"/cache_{hits,misses,bypass_hits,bypass_misses} 2>/dev/null | tr '\n' ' ')
                [[ $b != "$a" ]] && return 0
                sleep 0.25
            done ;;
    esac
}

# ---- cases: fc_case NAME sets FC_PREP (a function run before, unmeasured),
# FC_ARGS (the measured fio run), FC_DIR (read, write or mixed) -------------------------------
fio_prep() { taskset -c "$FIO_CPU" fio --name=prep --filename="$DEV_PATH" --ioengine=io_uring --direct=1 --eta=never --disk_util=0 \
             --output-format=json --output=/tmp/fc-prep.json "$@" >/tmp/fc-prep.stderr 2>&1 || die "prep fio on $DEV_PATH failed: $(tail -n 2 /tmp/fc-prep.stderr | tr '\n' ' ')"; }
# The hot set: the first FC_HOT_MB of the device, read 3 times in 64 KiB
# random reads (every block once per pass; random, so that bcache does not
# take it for a sequential stream and bypass it).
warm_hot() { fio_prep --rw=randread --bs=64k --iodepth=8 --size="${FC_HOT_MB}M" --loops=3; }
scan_prep() {
    warm_hot
    local t0=$EPOCHREALTIME
    fio_prep --rw=read --bs=1M --iodepth=8 --size="$((FC_SLOW_MB))M"
    FC_SCAN_S=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
}
fc_case() {
    FC_PREP=: FC_TIMED=1 FC_SIZE="" FC_DIR=read
    case $1 in
        hit-randread-4k-qd32) FC_PREP=warm_hot FC_SIZE="${FC_HOT_MB}M" FC_ARGS="--rw=randread --bs=4k --iodepth=32" ;;
        randwrite-4k-qd32) FC_ARGS="--rw=randwrite --bs=4k --iodepth=32" FC_DIR=write ;;
        zipf-7030) FC_ARGS="--rw=randrw --rwmixread=70 --random_distribution=zipf:1.1 --bs=4k --iodepth=32" FC_DIR=mixed ;;
        # One pass over the hot set after the scan (every block once): its hit rate.
        scan) FC_PREP=scan_prep FC_SIZE="${FC_HOT_MB}M" FC_TIMED=0 FC_ARGS="--rw=randread --bs=4k --iodepth=32" ;;
        fsync-write-4k-qd1) FC_ARGS="--rw=randwrite --bs=4k --iodepth=1 --fdatasync=1" FC_DIR=write ;;
        seqread-1m-qd8) FC_PREP=warm_hot FC_SIZE="${FC_HOT_MB}M" FC_ARGS="--rw=read --bs=1M --iodepth=8" ;;
        seqwrite-1m-qd8) FC_ARGS="--rw=write --bs=1M --iodepth=8" FC_DIR=write ;;
        *) return 1 ;;
    esac
}

# fc_snap PREFIX PID: fork-free: PREFIX_t (µs), PREFIX_busy / PREFIX_sys (ticks of all vCPUs:
# busy = all but idle and iowait; sys = system + irq + softirq), PREFIX_srv (utime+stime of PID).
fc_snap() {
    local p=$1 pid=${2:-} name u n sy idle iow irq sirq st rest
    local -a f
    printf -v "${p}_t" '%s' "${EPOCHREALTIME/./}"
    while read -r name u n sy idle iow irq sirq st rest; do
        [[ $name == cpu ]] || continue
        printf -v "${p}_busy" '%s' $((u + n + sy + irq + sirq + st))
        printf -v "${p}_sys" '%s' $((sy + irq + sirq))
        break
    done < /proc/stat
    local -i srv=0
    if [[ -n $pid && -r /proc/$pid/stat ]]; then
        read -r -a f < "/proc/$pid/stat" 2>/dev/null && srv=$((f[13] + f[14]))
    fi
    printf -v "${p}_srv" '%s' $srv
}

# fc_run REP CASE DEVICE ATTEMPT: fresh device, prep, measured run, teardown; prints @@RESULT.
fc_run() {
    local rep=$1 c=$2 d=$3 attempt=$4 t0=$SECONDS
    RUN_DISTURBED=0
    fc_case "$c"
    fc_flash_reset
    DEV_PATH="" DEV_PID="" DEV_ID="" DEV_NOTE="" DEV_EXTRA="{}" FC_SCAN_S=null FC_UBLK_CACHE_KB=null
    "fc_dev_$(fn "$d")_setup"
    [[ -b $DEV_PATH ]] || die "device $d: $DEV_PATH is not a block device"
    FC_CUR_DEV=$d
    local bdev; bdev=$(basename "$(realpath "$DEV_PATH")")
    [[ -w /sys/block/$bdev/queue/scheduler ]] && echo none > "/sys/block/$bdev/queue/scheduler" 2>/dev/null
    if [[ -z ${FC_DEV_SEEN[$d]:-} ]]; then
        FC_DEV_SEEN[$d]=1
        jq -cn --arg name "$d" --arg path "$DEV_PATH" --arg pid "$DEV_PID" --arg note "$DEV_NOTE" \
            --argjson size "$(blockdev --getsize64 "$DEV_PATH")" --arg aff "$([[ -n $DEV_PID ]] && affinity "$DEV_PID")" \
            '{name: $name, path: $path, server_pid: (if $pid == "" then null else ($pid | tonumber) end),
              server_affinity: (if $aff == "" then null else $aff end), note: $note, size: $size, extra: {}}' | sed 's/^/@@DEVICE /; s/$/@@/'
        log "device $d: $DEV_PATH ($DEV_NOTE)"
    fi
    local size; size=$(blockdev --getsize64 "$DEV_PATH")
    [[ -n $FC_SIZE ]] || FC_SIZE=$size
    local prep_t0=$EPOCHREALTIME
    "$FC_PREP"
    local prep_s; prep_s=$(awk -v a="$prep_t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    fc_settle "$d"
    local k0 k1
    k0=$(fc_counters "$d")
    host_quiet
    echo "@@START {\"case\":\"$c\",\"device\":\"$d\",\"rep\":$rep,\"attempt\":$attempt}@@"
    chan_ask MARK 5 >/dev/null
    local out=/tmp/fc-$c-$d-$rep.json timed=() rc
    [[ $FC_TIMED == 1 ]] && timed=(--time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
    # shellcheck disable=SC2086
    taskset -c "$FIO_CPU" fio --name=bench --filename="$DEV_PATH" --ioengine=io_uring --direct=1 --numjobs=1 \
        --size="$FC_SIZE" "${timed[@]}" --randrepeat=0 --eta=never --disk_util=0 \
        --percentile_list=50:99:99.9 --output-format=json --output="$out" \
        $FC_ARGS >/tmp/fio.stderr 2>&1 &
    local fpid=$! spid=""
    # The cache file's file system, sampled twice a second: its peak use (the
    # cache file may outgrow --cache-max-size before eviction catches up).
    if [[ $d == ublk-* ]]; then
        ( while :; do stat -f -c '%b %f %S' /mnt/fc-flash; sleep 0.5; done ) > /tmp/fc-df 2>/dev/null &
        spid=$!
    fi
    if [[ $FC_TIMED == 1 ]]; then
        sleep "$WIN_START"; fc_snap A "$DEV_PID"; sleep "$WIN_LEN"; fc_snap B "$DEV_PID"
        wait "$fpid"; rc=$?
    else
        fc_snap A "$DEV_PID"; wait "$fpid"; rc=$?; fc_snap B "$DEV_PID"
    fi
    local fs_peak=null
    if [[ -n $spid ]]; then
        kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
        fs_peak=$(awk '{ u = ($1 - $2) * $3 / 1048576; if (u > m) m = u } END { printf "%.0f", m }' /tmp/fc-df)
    fi
    fc_settle "$d"
    k1=$(fc_counters "$d")
    local hother=null hmax=null dist=null
    if chan_ask STAT 5; then
        hother=${CHAN_REPLY% *} hmax=${CHAN_REPLY#* }
        dist=$(awk -v o="$hother" -v t="$DISTURBED" 'BEGIN { print (o > t) ? "true" : "false" }')
        [[ $dist == true ]] && RUN_DISTURBED=1
    fi
    local extra=null
    [[ $d == bcache-* ]] && extra=$(jq -cn --arg s "$(cat "/sys/block/${DEV_PATH#/dev/}/bcache/state" 2>/dev/null)" '{bcache_state: $s}')
    "fc_dev_$(fn "$d")_teardown"
    [[ $d == ublk-* ]] && extra=$(jq -cn --argjson kb "${FC_UBLK_CACHE_KB:-null}" --argjson peak "${fs_peak:-null}" --argjson fs "$FC_UBLKFS_MB" \
        '{cache_file_kb_at_end: $kb, flash_fs_peak_used_mb: $peak, flash_fs_mb: $fs}')
    local meta res
    meta=$(jq -cn --arg case "$c" --arg device "$d" --argjson rep "$rep" --argjson attempt "$attempt" --arg dir "$FC_DIR" \
        --arg args "$FC_ARGS" --arg size "$FC_SIZE" --argjson timed "$FC_TIMED" \
        --argjson win "$((B_t - A_t))" --argjson srv "$([[ -n $DEV_PID ]] && echo $((B_srv - A_srv)) || echo null)" \
        --argjson busy "$((B_busy - A_busy))" --argjson sys "$((B_sys - A_sys))" \
        --argjson k0 "${k0:-null}" --argjson k1 "${k1:-null}" --argjson prep "$prep_s" --argjson scan "${FC_SCAN_S:-null}" \
        --argjson hother "$hother" --argjson hmax "$hmax" --argjson dist "$dist" --argjson extra "${extra:-null}" \
        --argjson setup_s "$((SECONDS - t0))" \
        '{case: $case, device: $device, rep: $rep, attempt: $attempt, dir: $dir, fio_args: $args, fio_size: $size, timed: ($timed == 1),
          cpu_window_s: ($win / 1e6), server_cpu_ticks: $srv, guest_busy_ticks: $busy, guest_sys_ticks: $sys,
          counters_before: $k0, counters_after: $k1, prep_s: $prep, scan_s: $scan, extra: $extra, case_s: $setup_s,
          host_other_cpu_pct: $hother, host_other_cpu_max_pct: $hmax, disturbed: $dist}')
    if [[ $rc -ne 0 ]] || ! res=$(jq -c --argjson m "$meta" '
            .jobs[0] as $j |
            def pct(s; p): (s.clat_ns.percentile[p] // null);
            ($j.read.iops + $j.write.iops) as $iops |
            $m + {iops: (if $m.dir == "read" then $j.read.iops elif $m.dir == "write" then $j.write.iops else $iops end),
                  read_iops: $j.read.iops, write_iops: $j.write.iops,
                  bw_bytes: (if $m.dir == "read" then $j.read.bw_bytes elif $m.dir == "write" then $j.write.bw_bytes else ($j.read.bw_bytes + $j.write.bw_bytes) end),
                  ios: ($j.read.total_ios + $j.write.total_ios),
                  clat_p50_ns: pct(if $m.dir == "write" then $j.write else $j.read end; "50.000000"),
                  clat_p99_ns: pct(if $m.dir == "write" then $j.write else $j.read end; "99.000000"),
                  write_clat_p99_ns: pct($j.write; "99.000000"),
                  clat_mean_ns: (if $m.dir == "write" then $j.write.clat_ns.mean else $j.read.clat_ns.mean end),
                  sync_p99_ns: ($j.sync.lat_ns.percentile["99.000000"] // null), sync_mean_ns: ($j.sync.lat_ns.mean // null),
                  runtime_ms: ([$j.read.runtime, $j.write.runtime] | max),
                  fio_errors: $j.error}' "$out" 2>/dev/null) || [[ $(jq -r .fio_errors <<<"$res") != 0 ]] \
            || { fc_has_counters "$d" && [[ ${k1:-null} == null || ${k0:-null} == null ]]; }; then
        local msg; msg=$(tail -n 3 /tmp/fio.stderr | tr '\n"' ' \047')
        [[ $rc -eq 0 && -n ${res:-} ]] && msg="no counters from the cache ($d): before ${k0:-null}, after ${k1:-null}"
        res=$(jq -c --arg e "fio exit $rc: $msg" '. + {error: $e}' <<<"$meta")
        log "rep $rep $c $d: FAILED ($msg)"
        FC_FAILED=$((FC_FAILED + 1))
    else
        jq -r '"[bench] rep \(.rep) \(.case) \(.device): \(.iops|floor) IOPS, \(.bw_bytes/1048576*10|floor/10) MiB/s, p99 \((.clat_p99_ns // 0)/1000|floor) us, hits \(if .counters_after and .counters_after.rh != null then "\(.counters_after.rh - .counters_before.rh)/\(.counters_after.rh + .counters_after.rm - .counters_before.rh - .counters_before.rm)" else "-" end); busy \(.guest_busy_ticks) ticks, server \(.server_cpu_ticks // "-") ticks; prep \(.prep_s) s; host others \(.host_other_cpu_pct // "?")%"' <<<"$res"
    fi
    echo "@@RESULT $res@@"
}

flashcache_main() {
    local c d rep attempt
    read -r -a CASES <<<"${BENCH_CASES:-${FC_ALL_CASES[*]}}"
    read -r -a DEVICES <<<"${BENCH_DEVICES:-${FC_ALL_DEVICES[*]}}"
    for c in "${CASES[@]}"; do fc_case "$c" || die "unknown case $c"; done
    for d in "${DEVICES[@]}"; do declare -F "fc_dev_$(fn "$d")_setup" >/dev/null || die "unknown device $d"; done
    [[ $(nproc) -gt $SERVER_CPU && $(nproc) -gt $FIO_CPU ]] || die "needs at least $((SERVER_CPU + 1)) vCPUs (vm/run.sh --smp 2)"
    taskset -cp "$FIO_CPU" $$ >/dev/null
    local WQ_MASK=/sys/devices/virtual/workqueue/cpumask
    if [[ $WQ_PIN == 1 ]]; then printf '%x\n' $((1 << SERVER_CPU)) > "$WQ_MASK" || die "cannot restrict $WQ_MASK"; fi
    WIN_START=$((RAMP + 1))
    WIN_LEN=$(awk -v t="$RUNTIME" 'BEGIN { w = t - 1.5; if (w < 0.5) w = 0.5; print w }')
    flash_file() { :; }    # kublk_add's file is the ceiling file, made by fc_media
    # The plan, CASE@DEVICE cells: every case on every device; the smoke test
    # (--quick): every case on ublk-wb (BENCH_FC_SMOKE_ALL), and every other
    # device set up for one case, the cases taken in turn.
    FC_PLAN=()
    local ci di j=0
    for d in "${DEVICES[@]}"; do
        if [[ ${BENCH_FC_PLAN:-full} == smoke && " ${BENCH_FC_SMOKE_ALL:-ublk-wb} " != *" $d "* ]]; then
            FC_PLAN+=("${CASES[$((j % ${#CASES[@]}))]}@$d"); j=$((j + 1))
        else
            for c in "${CASES[@]}"; do FC_PLAN+=("$c@$d"); done
        fi
    done
    fc_media
    jq -cn --arg kernel "$(uname -r)" --arg fio "$(fio --version)" --argjson reps "$REPS" --argjson runtime "$RUNTIME" \
        --argjson ramp "$RAMP" --arg wqmask "$(cat "$WQ_MASK" 2>/dev/null)" --argjson fio_cpu "$FIO_CPU" --argjson server_cpu "$SERVER_CPU" \
        --argjson ncpu "$(nproc --all)" --argjson mem_mb "$(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo)" \
        --arg cases "${CASES[*]}" --arg devices "${DEVICES[*]}" --arg kublk "$(cat /etc/kublk-version 2>/dev/null | paste -sd';')" \
        --argjson slow "$FC_SLOW_MB" --argjson cache "$FC_CACHE_MB" --argjson hot "$FC_HOT_MB" --argjson ufs "$FC_UBLKFS_MB" \
        --argjson rms "$FC_READ_MS" --argjson wms "$FC_WRITE_MS" --arg dmsetup "$("$DMSETUP" --version 2>&1 | paste -sd' ')" \
        --arg hz "$(getconf CLK_TCK 2>/dev/null || echo 100)" --arg plan "${FC_PLAN[*]}" \
        '{suite: "flashcache", kernel: $kernel, fio: $fio, reps: $reps, runtime_s: $runtime, ramp_s: $ramp, unbound_wq_cpumask: $wqmask,
          fio_cpu: $fio_cpu, server_cpu: $server_cpu, guest_cpus: $ncpu, guest_mem_mb: $mem_mb, kublk: $kublk, dmsetup: $dmsetup,
          slow_mb: $slow, cache_mb: $cache, hot_mb: $hot, ublk_fs_mb: $ufs, slow_read_ms: $rms, slow_write_ms: $wms, clk_tck: ($hz | tonumber),
          cases: ($cases | split(" ")), devices: ($devices | split(" ")), plan: ($plan | split(" ") | map(split("@")))}' | sed 's/^/@@META /; s/$/@@/'
    chan_open
    declare -gA FC_DEV_SEEN=()
    FC_FAILED=0
    trap 'log "cleaning up"; [[ -n ${FC_CUR_DEV:-} ]] && "fc_dev_$(fn "$FC_CUR_DEV")_teardown" >/dev/null 2>&1' EXIT
    local t_start=$SECONDS
    for rep in $(seq 1 "$REPS"); do
        for c in "${CASES[@]}"; do
            for d in "${DEVICES[@]}"; do
                [[ " ${FC_PLAN[*]} " == *" $c@$d "* ]] || continue
                attempt=0
                while :; do
                    fc_run "$rep" "$c" "$d" "$attempt"
                    FC_CUR_DEV=""
                    [[ $RUN_DISTURBED == 1 && $attempt -lt 2 && $RETRY_BUDGET -gt 0 ]] || break
                    attempt=$((attempt + 1)) RETRY_BUDGET=$((RETRY_BUDGET - 1))
                    log "rep $rep $c $d was disturbed by other host processes: repeating it (repeats left: $RETRY_BUDGET)"
                done
            done
            log "rep $rep case $c done ($((SECONDS - t_start)) s)"
        done
    done
    trap - EXIT
    echo "@@DONE@@"
    [[ $FC_FAILED == 0 ]] || { log "$FC_FAILED run(s) failed"; return 1; }
}
