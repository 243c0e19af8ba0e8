# On the real driver: the page-state model of the caching targets.
# Local writes are never replaced by remote bytes (whatever their dirty bit
# says), eviction never races I/O in flight, a cache file system that runs
# full fails reads with EIO and never hangs or serves wrong bytes.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/integrity
mkdir -p $WWW $C
head -c $((64 << 20)) /dev/urandom > $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
FIO="fio --ioengine=io_uring --direct=1 --iodepth=16 --randrepeat=1 --randseed=7 --verify_fatal=1"
same() { cmp <(dd if=$1 bs=1M skip=$2 count=$3 iflag=direct 2>/dev/null) <(dd if=$4 bs=1M skip=$2 count=$3 2>/dev/null); }

section "written pages survive dirty --clear and eviction (not refetched)"
if add -t http --url $URL --cache $C/o.cache --bitmap $C/o.bitmap --writable --cache-max-size 4M; then
    head -c $((8 << 20)) /dev/urandom > /tmp/w8
    check "write 8 MiB" dd if=/tmp/w8 of=$DEV_B bs=1M oflag=direct conv=fsync
    check "dirty --clear" "$UBLK" dirty -n $DEV_ID --clear
    eq "nothing dirty" 0 "$("$UBLK" dirty -n $DEV_ID | jq -r .pages)"
    # Reading 32 MiB through a 4 MiB bound evicts every clean page, many times over.
    check "read 32 MiB more (evicting)" same $DEV_B 8 32 $WWW/disk.img
    check "read it again" same $DEV_B 8 32 $WWW/disk.img
    check "the written 8 MiB still read back (never refetched)" bash -c "cmp <(dd if=$DEV_B bs=1M count=8 iflag=direct 2>/dev/null) /tmp/w8"
    # Allocated: the local 8 MiB plus at most the bound and its slack.
    A=$(( $(stat -c %b $C/o.cache) * 512 ))
    echo "# cache file holds $A bytes"
    check "the bound holds for clean pages" test $A -le $(( (8 + 4 + 2) << 20 ))
    check "del" del $DEV_ID
else
    fail "add --writable --cache-max-size" "$DEV_JSON"
fi

section "a changed remote does not wipe an overlay whose dirty list is empty"
touch -d '2030-01-01' $WWW/disk.img   # new Last-Modified and ETag, same bytes
expect_error "add refuses (local pages would be lost)" "local|written" \
    "$UBLK" add -t http --url $URL --cache $C/o.cache --bitmap $C/o.bitmap --writable
touch -d '2031-01-01' $WWW/disk.img

section "eviction under fio --verify on a writable overlay (bound far below the working set)"
if add -t http --url $URL --cache $C/e.cache --bitmap $C/e.bitmap --writable --cache-max-size 2M; then
    check "fio randrw verify 12M" $FIO --name=ev --filename=$DEV_B --rw=randrw --bs=4k --size=12M \
        --verify=crc32c --do_verify=1 --output=/tmp/fio-ev.txt
    check "fio seq verify 1M blocks" $FIO --name=ev2 --filename=$DEV_B --rw=write --bs=1M --offset=32M --size=8M \
        --verify=crc32c --do_verify=1 --output=/tmp/fio-ev2.txt
    check "bytes nobody wrote are the remote's" same $DEV_B 48 16 $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add overlay --cache-max-size 2M" "$DEV_JSON"
fi

section "eviction under fio --verify on a write-back cache"
truncate -s 64M /tmp/back.img
if add -t cache --backing /tmp/back.img --cache $C/b.cache --bitmap $C/b.bitmap --write-mode back --cache-max-size 2M; then
    check "fio randwrite verify 16M" $FIO --name=wb --filename=$DEV_B --rw=randwrite --bs=4k --size=16M \
        --verify=crc32c --do_verify=1 --output=/tmp/fio-wb.txt
    check "flush" timeout 120 "$UBLK" flush -n $DEV_ID
    check "the backing alone equals the device" cmp $DEV_B /tmp/back.img
    check "del" del $DEV_ID
else
    fail "add cache back --cache-max-size 2M" "$DEV_JSON"
fi

section "the cache file system runs full: reads fail with EIO, never hang, never wrong bytes"
mkdir -p /mnt/small && mount -t tmpfs -o size=8m tmpfs /mnt/small
if add -t http --url $URL --cache /mnt/small/c --bitmap $C/s.bitmap; then
    check "the first 4 MiB read back" same $DEV_B 0 4 $WWW/disk.img
    timeout 120 dd if=$DEV_B of=/tmp/all bs=1M iflag=direct 2>/tmp/dd.err; rc=$?
    echo "# dd: exit $rc: $(tail -n 1 /tmp/dd.err)"
    check "reading it all fails (the cache is full) and does not hang" test $rc -ne 0 -a $rc -lt 124
    check "with EIO" grep -q "Input/output error" /tmp/dd.err
    check "what dd got before the error is the remote's" cmp -n $(stat -c %s /tmp/all) /tmp/all $WWW/disk.img
    check "the server is alive" alive $DEV_PID
    check "the first 4 MiB still read back" same $DEV_B 0 4 $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add with the cache on a small tmpfs" "$DEV_JSON"
fi
rm -f /mnt/small/c $C/s.bitmap*
# The bound is kept between fetches: the runs in flight (readahead up to 8 MiB,
# runs of up to 4 MiB per connection) come on top of it.
mount -o remount,size=40m /mnt/small
if add -t http --url $URL --cache /mnt/small/c --bitmap $C/s.bitmap --cache-max-size 4M; then
    check "with --cache-max-size well under the file system's size, it all reads back" same $DEV_B 0 64 $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add with --cache-max-size 4M on a small tmpfs" "$DEV_JSON"
fi
umount /mnt/small

section "EIO from the cache's disk (device mapper): FLUSH fails, nothing hangs, reads never lie"
# Two 128 MiB RAM disks: room for a whole 64 MiB cache file and its bitmaps.
export DM_DISABLE_UDEV=1
kmod-load brd rd_nr=2 rd_size=131072 && kmod-load dm_mod && kmod-load dm_flakey
SECTORS=$(blockdev --getsz /dev/ram0)
dm() { dmsetup --noudevsync "$@" && dmsetup mknodes >/dev/null 2>&1; }
# swap DEV TABLE: a new table for DEV, resumed whatever happens (never left suspended).
swap() { local rc; dmsetup --noudevsync suspend "$1" || return 1; dmsetup --noudevsync load "$1" --table "$2"; rc=$?; dmsetup --noudevsync resume "$1"; return $rc; }
if check "a device-mapper disk" dm create flaky --table "0 $SECTORS linear /dev/ram0 0"; then
    # No journal, errors=continue: the file system stays writable when the disk fails.
    mkdir -p /mnt/f
    check "ext2 on it" bash -c "mkfs.ext4 -q -F -O ^has_journal /dev/mapper/flaky && mount -o errors=continue /dev/mapper/flaky /mnt/f"
    if add -t http --url $URL --cache /mnt/f/c --bitmap $C/f.bitmap --writable; then
        head -c $((1 << 20)) /dev/urandom > /tmp/f1
        check "write 1 MiB and FLUSH while the disk is good" dd if=/tmp/f1 of=$DEV_B bs=1M seek=2 oflag=direct conv=fsync
        check "a fetched MiB reads back" same $DEV_B 8 1 $WWW/disk.img
        # From now on every I/O to the cache's disk fails.
        check "the disk fails" swap flaky "0 $SECTORS error"
        head -c $((1 << 20)) /dev/urandom > /tmp/f2
        timeout 120 dd if=/tmp/f2 of=$DEV_B bs=1M seek=4 oflag=direct conv=fsync 2>/tmp/dd2.err; rc=$?
        echo "# write + FLUSH on the failed disk: exit $rc: $(tail -n 1 /tmp/dd2.err)"
        check "a write and FLUSH on the failed disk fails, without hanging" test $rc -ne 0 -a $rc -lt 124
        timeout 60 bash -c "echo x | dd of=$DEV_B bs=512 seek=1 count=1 conv=fsync,notrunc 2>/dev/null"; rc=$?
        check "a later FLUSH fails too (the loss is not forgotten)" test $rc -ne 0 -a $rc -lt 124
        # Reads: from memory or EIO, never other bytes.
        for m in 2 8 20; do
            exp=/tmp/f1; [ $m -ne 2 ] && exp=$WWW/disk.img
            if timeout 60 dd if=$DEV_B of=/tmp/r$m bs=1M skip=$m count=1 iflag=direct 2>/dev/null; then
                if [ $m -eq 2 ]; then check "MiB $m read: the data written there" cmp /tmp/r$m /tmp/f1
                else check "MiB $m read: the remote's bytes" cmp /tmp/r$m <(dd if=$WWW/disk.img bs=1M skip=$m count=1 2>/dev/null); fi
            else
                rc=$?; check "MiB $m read failed with an error, not a hang" test $rc -lt 124
            fi
        done
        check "the server is alive" alive $DEV_PID
        check "del" del $DEV_ID
    else
        fail "add with the cache on a device-mapper disk" "$DEV_JSON"
    fi
    umount -l /mnt/f 2>/dev/null
    dmsetup --noudevsync remove flaky >/dev/null 2>&1
fi

section "a power loss (the cache's disk drops every write from one moment on)"
# From the switch on nothing reaches ram1, as when the power goes: what the
# file system shows after a remount is what a power loss would have left.
# /run dies with the machine, and with it the live page states.
cp $WWW/disk.img /var/tmp/rep.img
# pagewise FILE: one line per 4 KiB page, its bytes in hex (one process: a fork per page costs minutes under TCG).
pagewise() { od -A n -v -t x8 -w4096 "$1"; }
if check "a device-mapper disk for the cache and its bitmaps" bash -c "dmsetup --noudevsync create pl --table '0 $SECTORS linear /dev/ram1 0' && dmsetup mknodes && mkfs.ext4 -q -F /dev/mapper/pl && mkdir -p /mnt/p && mount /dev/mapper/pl /mnt/p"; then
    OPTS="--url $URL --cache /mnt/p/c --bitmap /mnt/p/b --writable"
    if add -t http $OPTS; then
        head -c $((4 << 20)) /dev/urandom > /tmp/pa; head -c $((4 << 20)) /dev/urandom > /tmp/pb
        check "4 MiB written and FLUSHed" dd if=/tmp/pa of=$DEV_B bs=1M oflag=direct conv=fsync
        check "sync to a replica" "$UBLK" sync -n $DEV_ID --to /var/tmp/rep.img
        check "4 MiB more written, not FLUSHed" dd if=/tmp/pb of=$DEV_B bs=1M seek=8 oflag=direct
        check "power loss: the disk drops every write from now on" swap pl "0 $SECTORS flakey /dev/ram1 0 0 1 1 drop_writes"
        dd if=/dev/urandom of=$DEV_B bs=1M seek=16 count=2 oflag=direct conv=fsync 2>/dev/null  # lost, whatever it says
        kill -9 $DEV_PID; wait_for 10 dead $DEV_PID; del $DEV_ID >/dev/null 2>&1
        rm -rf /run/ublk-http/live
        umount /mnt/p
        check "power back: the disk as the loss left it" bash -c "$(declare -f swap); swap pl '0 $SECTORS linear /dev/ram1 0' && mount /dev/mapper/pl /mnt/p"
        if add -t http $OPTS; then
            check "the FLUSHed 4 MiB read back" bash -c "cmp <(dd if=$DEV_B bs=1M count=4 iflag=direct 2>/dev/null) /tmp/pa"
            dd if=$DEV_B bs=1M skip=8 count=4 iflag=direct of=/tmp/pd 2>/dev/null
            dd if=$WWW/disk.img bs=1M skip=8 count=4 of=/tmp/pr 2>/dev/null
            eq "4 MiB read: 1024 pages" 1024 "$(pagewise /tmp/pd | wc -l)"
            bad=$(paste -d'|' <(pagewise /tmp/pd) <(pagewise /tmp/pb) <(pagewise /tmp/pr) | awk -F'|' '$1 != $2 && $1 != $3' | wc -l)
            eq "every unFLUSHed page reads as written or as the remote's (never zeros or other bytes)" 0 "$bad"
            check "bytes nobody wrote are the remote's" same $DEV_B 24 40 $WWW/disk.img
            check "sync after the power loss" "$UBLK" sync -n $DEV_ID --to /var/tmp/rep.img
            check "the replica is exact" cmp $DEV_B /var/tmp/rep.img
            check "del" del $DEV_ID
        else
            fail "add after the power loss" "$DEV_JSON"
        fi
    else
        fail "add with the cache on the device-mapper disk" "$DEV_JSON"
    fi
    umount /mnt/p 2>/dev/null
    dmsetup --noudevsync remove pl >/dev/null 2>&1
fi

section "a slow disk under the bitmaps stalls no read (the queue blocks only in io_uring_enter)"
# Every write and flush to the bitmaps' disk takes 4 s (dm-delay). Persisting
# goes through the ring, so reads of cached pages go on meanwhile; a server
# that wrote and fdatasync'ed its bitmaps on the queue's thread stalled them,
# and some read would wait seconds. Measured as the slowest single read (fio's
# max latency), not as a total time, which a busy host stretches.
kmod-load dm_delay
if check "ext4 for the bitmaps" bash -c "dmsetup --noudevsync create slow --table '0 $SECTORS linear /dev/ram1 0' && dmsetup mknodes && mkfs.ext4 -q -F /dev/mapper/slow && mkdir -p /mnt/s && mount /dev/mapper/slow /mnt/s"; then
    if add -t http --url $URL --cache /var/tmp/s.cache --bitmap /mnt/s/b --writable; then
        check "read 5 MiB (cached from now on)" same $DEV_B 0 5 $WWW/disk.img
        sleep 1.5  # their bits persisted
        check "the bitmaps' disk now takes 4 s for every write and flush" swap slow "0 $SECTORS delay /dev/ram1 0 0 /dev/ram1 0 4000 /dev/ram1 0 4000"
        # A writer of cached pages (MiB 4, beside the 4 MiB read below): each write's bits go to the slow disk first.
        ( for i in 0 1; do dd if=/dev/urandom of=$DEV_B bs=4k seek=$((1024 + i * 16)) count=1 oflag=direct 2>/dev/null; done ) &
        W=$!
        sleep 1
        fio --name=r --filename=$DEV_B --rw=read --bs=4k --size=4M --direct=1 --ioengine=psync \
            --output-format=json --output=/tmp/slow.json >/dev/null 2>&1; rc=$?
        max_ms=$(jq '.jobs[0].read.lat_ns.max / 1000000 | floor' /tmp/slow.json 2>/dev/null)
        n=$(jq '.jobs[0].read.total_ios' /tmp/slow.json 2>/dev/null)
        echo "# $n cached 4 KiB reads; the slowest took ${max_ms} ms while the bitmaps' disk answered in 4 s"
        eq "the reads succeed" 0 $rc
        eq "all 1024 of them" 1024 "$n"
        check "and none waited for the slow disk (each under 2 s)" test "${max_ms:-99999}" -lt 2000
        check "the writer is still at it (the reads ran beside it)" alive $W
        wait $W
        check "the writes are listed dirty" bash -c "$UBLK dirty -n $DEV_ID | jq -e '.pages >= 2'"
        check "the disk is fast again" swap slow "0 $SECTORS linear /dev/ram1 0"
        check "del" del $DEV_ID
    else
        fail "add with the bitmaps on a device-mapper disk" "$DEV_JSON"
    fi
    umount /mnt/s 2>/dev/null
    dmsetup --noudevsync remove slow >/dev/null 2>&1
fi

finish
