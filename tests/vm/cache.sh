# The cache target on the real driver: write-through and write-back,
# kill -9 under writes in back mode, flush, a block device as backing store.
source /tests/lib.sh
set -o pipefail
C=/var/tmp/cache; mkdir -p $C
FIO="fio --ioengine=io_uring --direct=1 --bs=4k --iodepth=16 --randrepeat=1 --randseed=42"

section "write-through: fio --verify=crc32c over 32 MiB of 128; backing equals the device after a FLUSH"
truncate -s 128M /tmp/back1.img
if add -t cache --backing /tmp/back1.img --cache $C/t.cache --bitmap $C/t.bitmap --write-mode through; then
    eq "target cache, through" through "$(echo "$DEV_JSON" | jq -r .target_options.write_mode)"
    check "fio randwrite verify 32M" $FIO --name=t --filename=$DEV_B --rw=randwrite --size=32M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio-t.txt
    sleep 1.2
    F=$("$UBLK" stats -n $DEV_ID --json | jq -r .bytes_fetched)
    echo "# read from the backing store while writing 32 MiB of whole pages: $F bytes"
    check "whole-page writes read (almost) nothing from the backing store" test "$F" -lt $((1 << 20))
    check "a FLUSH" dd if=/dev/urandom of=$DEV_B bs=4k count=1 seek=7 oflag=direct conv=fsync
    check "backing equals the device" cmp $DEV_B /tmp/back1.img
    check "dirty tracking lists the writes" bash -c "$UBLK dirty -n $DEV_ID | jq -e '.pages > 0'"
    check "del" del $DEV_ID
else
    fail "add -t cache through" "$DEV_JSON"
fi

section "reads are cached: a second pass reads nothing from the backing store"
if add -t cache --backing /tmp/back1.img --cache $C/t.cache --bitmap $C/t.bitmap; then
    eq "cache reused" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "read it all" cmp $DEV_B /tmp/back1.img
    sleep 1.2
    B=$("$UBLK" stats -n $DEV_ID --json | jq -r .bytes_fetched)
    check "read it all again" cmp $DEV_B /tmp/back1.img
    sleep 1.2
    eq "nothing more fetched from the backing store" "$B" "$("$UBLK" stats -n $DEV_ID --json | jq -r .bytes_fetched)"
    del $DEV_ID >/dev/null
fi

section "write-back: kill -9 under writes, add again, flush, the backing alone verifies"
truncate -s 128M /tmp/back2.img
if add -t cache --backing /tmp/back2.img --cache $C/b.cache --bitmap $C/b.bitmap --write-mode back; then
    check "fio randwrite 32M, verified, fsync at the end" $FIO --name=b --filename=$DEV_B --rw=randwrite --size=32M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --end_fsync=1 --output=/tmp/fio-b.txt
    $FIO --name=more --filename=$DEV_B --rw=randwrite --offset=64M --size=64M --time_based --runtime=60 \
        --output=/tmp/fio-more.txt >/dev/null 2>&1 &
    MORE=$!
    sleep 3
    kill -9 $DEV_PID
    wait_for 30 dead $MORE; kill -9 $MORE 2>/dev/null; wait $MORE 2>/dev/null
    del $DEV_ID >/dev/null 2>&1
    expect_error "the cache is refused in through mode while pages await write-back" "not yet written back" \
        "$UBLK" add -t cache --backing /tmp/back2.img --cache $C/b.cache --bitmap $C/b.bitmap
    if add -t cache --backing /tmp/back2.img --cache $C/b.cache --bitmap $C/b.bitmap --write-mode back; then
        F=$(timeout 300 "$UBLK" flush -n $DEV_ID)
        eq "flush returns when nothing is left" 0 "$(echo "$F" | jq -r .writeback_pages)"
        check "del" del $DEV_ID
        check "the backing store alone verifies" $FIO --name=b --filename=/tmp/back2.img --rw=randwrite --size=32M \
            --verify=crc32c --verify_only=1 --verify_fatal=1 --direct=0 --output=/tmp/fio-verify.txt
    else
        fail "add back again" "$DEV_JSON"
    fi
else
    fail "add -t cache back" "$DEV_JSON"
fi

section "a block device as the backing store"
kmod-load brd rd_nr=2 rd_size=65536
if add -t cache --backing /dev/ram0 --cache $C/r.cache --bitmap $C/r.bitmap; then
    eq "size of the ramdisk" 67108864 "$(blockdev --getsize64 $DEV_B)"
    check "write and read back" bash -c "head -c 1048576 /dev/urandom > /tmp/r1 && dd if=/tmp/r1 of=$DEV_B bs=1M seek=3 oflag=direct conv=fsync 2>/dev/null && cmp <(dd if=/dev/ram0 bs=1M skip=3 count=1 iflag=direct 2>/dev/null) /tmp/r1"
    del $DEV_ID >/dev/null
else
    fail "add -t cache on /dev/ram0" "$DEV_JSON"
fi

section "cache and backing on ext4: O_DIRECT for both, reported; fio --verify 512 B-1 MiB; write-back leaves backing == device"
# /dev/ram0 (the backing's file system) is free again after the section above.
mkdir -p /mnt/c /mnt/b /mnt/t
if check "ext4 on /dev/ram1 for the cache, on /dev/ram0 for the backing" bash -c "mkfs.ext4 -q -F /dev/ram1 && mount -t ext4 /dev/ram1 /mnt/c && mkfs.ext4 -q -F /dev/ram0 && mount -t ext4 /dev/ram0 /mnt/b"; then
    head -c $((32 << 20)) /dev/urandom > /mnt/b/back3.img
    if add -t cache --backing /mnt/b/back3.img --cache /mnt/c/e.cache --bitmap /mnt/c/e.bitmap --write-mode back; then
        eq "cache_io direct" direct "$(echo "$DEV_JSON" | jq -r .target_options.cache_io)"
        eq "backing_io direct" direct "$(echo "$DEV_JSON" | jq -r .target_options.backing_io)"
        eq "list reports them too" "direct direct" "$("$UBLK" list -n $DEV_ID | jq -r '.[0].target_options | "\(.cache_io) \(.backing_io)"')"
        # brd's logical block is 512 bytes, and so is ext4's direct I/O alignment on it.
        eq "logical block size follows the files' alignment" 512 "$(cat /sys/block/ublkb$DEV_ID/queue/logical_block_size)"
        check "read half of it cold" cmp -n $((16 << 20)) $DEV_B /mnt/b/back3.img
        check "fio randrw 512 B-1 MiB, partial and whole pages, verify" $FIO --name=e --filename=$DEV_B \
            --rw=randrw --bsrange=512-1m --blockalign=512 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
            --output=/tmp/fio-e.txt
        check "fio randwrite 512 B-1 MiB, verify after all writes" $FIO --name=e2 --filename=$DEV_B \
            --rw=randwrite --bsrange=512-1m --blockalign=512 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
            --verify_backlog=0 --output=/tmp/fio-e2.txt
        check "a 1 MiB write that half covers cached pages reads back" bash -c "head -c 1048576 /dev/urandom > /tmp/e1 && dd if=/tmp/e1 of=$DEV_B bs=1M seek=15 oflag=direct 2>/dev/null && cmp <(dd if=$DEV_B bs=1M skip=15 count=1 iflag=direct 2>/dev/null) /tmp/e1"
        check "a FLUSH" sync $DEV_B
        check "flush (write-back)" "$UBLK" flush -n $DEV_ID
        check "the backing store equals the device" cmp $DEV_B /mnt/b/back3.img
        check "del" del $DEV_ID
        check "and after del, with the page cache dropped" bash -c "echo 3 > /proc/sys/vm/drop_caches; cmp /mnt/b/back3.img <(dd if=/mnt/b/back3.img bs=1M iflag=direct 2>/dev/null)"
    else
        fail "add -t cache with cache and backing on ext4" "$DEV_JSON"
    fi

    section "write-through on ext4 (both direct): fio --verify, backing equals the device"
    if add -t cache --backing /mnt/b/back3.img --cache /mnt/c/e.cache --bitmap /mnt/c/e.bitmap --write-mode through; then
        eq "cache_io direct (through)" direct "$(echo "$DEV_JSON" | jq -r .target_options.cache_io)"
        eq "cache reused" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
        check "fio randrw 512 B-1 MiB, verify (through)" $FIO --name=w --filename=$DEV_B \
            --rw=randrw --bsrange=512-1m --blockalign=512 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
            --output=/tmp/fio-w.txt
        check "the backing store equals the device (through)" cmp $DEV_B /mnt/b/back3.img
        check "del" del $DEV_ID
    else
        fail "add -t cache through on ext4" "$DEV_JSON"
    fi

    section "the cache on tmpfs: the in-memory path, reported; the backing on ext4 stays direct"
    if check "tmpfs" mount -t tmpfs -o size=40m tmpfs /mnt/t && \
        add -t cache --backing /mnt/b/back3.img --cache /mnt/t/m.cache --bitmap /mnt/t/m.bitmap --write-mode through; then
        eq "cache_io inline on tmpfs" "inline (file in memory: tmpfs)" "$(echo "$DEV_JSON" | jq -r .target_options.cache_io)"
        eq "backing_io direct beside it" direct "$(echo "$DEV_JSON" | jq -r .target_options.backing_io)"
        check "write-through from the mapped cache file to a direct backing, read back" bash -c "head -c 1048576 /dev/urandom > /tmp/m1 && dd if=/tmp/m1 of=$DEV_B bs=4k seek=1001 oflag=direct 2>/dev/null && cmp <(dd if=/mnt/b/back3.img bs=4k skip=1001 count=256 iflag=direct 2>/dev/null) /tmp/m1 && cmp <(dd if=$DEV_B bs=4k skip=1001 count=256 iflag=direct 2>/dev/null) /tmp/m1"
        check "del" del $DEV_ID
    else
        fail "add -t cache with the cache on tmpfs" "$DEV_JSON"
    fi
    umount /mnt/t 2>/dev/null

    section "http with its cache on ext4: direct, an image of 3000003 bytes, del and add again fetch nothing"
    mkdir -p /srv/www
    head -c 3000003 /dev/urandom > /srv/www/odd3.bin
    if check "nginx" nginx-start /srv/www 8080 && \
        add -t http --url http://127.0.0.1:8080/odd3.bin --cache /mnt/c/h.cache --bitmap /mnt/c/h.bitmap; then
        eq "cache_io direct (http)" direct "$(echo "$DEV_JSON" | jq -r .target_options.cache_io)"
        eq "device: the image rounded up to the 512-byte block" 3000320 "$(blockdev --getsize64 $DEV_B)"
        check "the object's bytes, then zeros (cold, 4 KiB direct reads)" bash -c "cmp <(dd if=$DEV_B bs=4k iflag=direct 2>/dev/null | head -c 3000003) /srv/www/odd3.bin && cmp <(tail -c 317 $DEV_B) <(head -c 317 /dev/zero)"
        check "read it all again, buffered" cmp <(head -c 3000003 $DEV_B) /srv/www/odd3.bin
        check "del" del $DEV_ID
        if add -t http --url http://127.0.0.1:8080/odd3.bin --cache /mnt/c/h.cache --bitmap /mnt/c/h.bitmap; then
            eq "cache reused (http)" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
            eq "cache_io direct again" direct "$(echo "$DEV_JSON" | jq -r .target_options.cache_io)"
            check "cmp after add again" bash -c "cmp <(head -c 3000003 $DEV_B) /srv/www/odd3.bin"
            sleep 1.2
            eq "nothing fetched again" 0 "$("$UBLK" stats -n $DEV_ID --json | jq -r .bytes_fetched)"
            check "del" del $DEV_ID
        else
            fail "add http again" "$DEV_JSON"
        fi
    else
        fail "add -t http with the cache on ext4" "$DEV_JSON"
    fi

    section "a cache file system on 4096-byte sectors: 4 KiB blocks, the odd image's last block padded to 4096"
    kmod-load loop 2>/dev/null
    mkdir -p /mnt/k
    truncate -s 96M /tmp/k4.img
    if L=$(losetup --find --show --sector-size 4096 /tmp/k4.img) && check "ext4 on a 4Kn loop device ($L)" bash -c "mkfs.ext4 -q -F $L && mount -t ext4 $L /mnt/k"; then
        if add -t http --url http://127.0.0.1:8080/odd3.bin --cache /mnt/k/h.cache --bitmap /mnt/k/h.bitmap; then
            eq "cache_io direct (4Kn)" direct "$(echo "$DEV_JSON" | jq -r .target_options.cache_io)"
            eq "logical block 4096 (4Kn)" 4096 "$(cat /sys/block/ublkb$DEV_ID/queue/logical_block_size)"
            eq "device: the image rounded up to 4096" 3002368 "$(blockdev --getsize64 $DEV_B)"
            check "the object's bytes, then zeros (4Kn)" bash -c "cmp <(head -c 3000003 $DEV_B) /srv/www/odd3.bin && cmp <(tail -c 2365 $DEV_B) <(head -c 2365 /dev/zero)"
            check "del" del $DEV_ID
            if add -t http --url http://127.0.0.1:8080/odd3.bin --cache /mnt/k/h.cache --bitmap /mnt/k/h.bitmap; then
                check "cmp after add again (4Kn)" bash -c "cmp <(dd if=$DEV_B bs=64k iflag=direct 2>/dev/null | head -c 3000003) /srv/www/odd3.bin"
                sleep 1.2
                eq "nothing fetched again (4Kn)" 0 "$("$UBLK" stats -n $DEV_ID --json | jq -r .bytes_fetched)"
                check "del" del $DEV_ID
            else
                fail "add http again (4Kn)" "$DEV_JSON"
            fi
        else
            fail "add -t http with the cache on 4Kn ext4" "$DEV_JSON"
        fi
        if add -t cache --backing /mnt/b/back3.img --cache /mnt/k/e.cache --bitmap /mnt/k/e.bitmap --write-mode back; then
            eq "cache_io and backing_io direct (4Kn cache)" "direct direct" "$(echo "$DEV_JSON" | jq -r '.target_options | "\(.cache_io) \(.backing_io)"')"
            eq "logical block 4096 (4Kn cache)" 4096 "$(cat /sys/block/ublkb$DEV_ID/queue/logical_block_size)"
            check "fio randrw 4 KiB-1 MiB, verify (4Kn)" $FIO --name=k --filename=$DEV_B \
                --rw=randrw --bsrange=4k-1m --blockalign=4k --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \
                --output=/tmp/fio-k.txt
            check "flush (4Kn)" "$UBLK" flush -n $DEV_ID
            check "the backing store equals the device (4Kn)" cmp $DEV_B /mnt/b/back3.img
            check "del" del $DEV_ID
        else
            fail "add -t cache with the cache on 4Kn ext4" "$DEV_JSON"
        fi
        umount /mnt/k
        losetup -d $L
    else
        fail "a 4Kn loop device" "losetup --sector-size 4096 failed"
    fi
    rm -f /tmp/k4.img

    nginx-stop 2>/dev/null
    umount /mnt/c; umount /mnt/b
fi

section "the cache on the guest's root file system (in memory): reported as such"
if add -t cache --backing /tmp/back1.img --cache $C/t.cache --bitmap $C/t.bitmap; then
    check "cache_io is the in-memory path or buffered, with its reason" bash -c "echo '$DEV_JSON' | jq -r .target_options.cache_io | grep -Eq '^(inline|buffered) \(.+\)$'"
    del $DEV_ID >/dev/null
fi

section "bad inputs"
expect_error "cache needs --backing" "needs --backing" "$UBLK" add -t cache --cache $C/x --bitmap $C/y
expect_error "cache needs --cache" "needs --cache FILE and --bitmap" "$UBLK" add -t cache --backing /tmp/back1.img
section "a scan read once leaves the hot pages cached: --admit reuse keeps them, --admit all loses them"
# 64 MiB of backing store behind an 8 MiB cache: the hot set is the first 4 MiB,
# read three times; the scan reads the other 60 MiB once; then the hot set again.
truncate -s 64M /tmp/back3.img
dd if=/dev/urandom of=/tmp/back3.img bs=1M count=64 conv=notrunc status=none
scan_then_hot() {  # $1: --admit mode. Prints "BYTES-FETCHED-BY-THE-HOT-REREAD READS-THROUGH SAME(1: reads back the backing store)".
    rm -f $C/s.cache $C/s.bitmap*
    add -t cache --backing /tmp/back3.img --cache $C/s.cache --bitmap $C/s.bitmap --cache-max-size 8M --admit $1 \
        || { echo "failed: $DEV_JSON"; return; }
    for i in 1 2 3; do dd if=$DEV_B of=/dev/null bs=64k count=64 iflag=direct status=none; done
    dd if=$DEV_B of=/dev/null bs=1M skip=4 iflag=direct status=none
    sleep 2.2  # eviction and the statistics run once the device is idle
    # Bytes fetched, not misses: readahead turns most misses of a sequential re-read into waits on one fetch.
    local f0; f0=$("$UBLK" stats -n $DEV_ID --json | jq -r .bytes_fetched)
    dd if=$DEV_B of=/dev/null bs=64k count=64 iflag=direct status=none
    sleep 1.2
    local st; st=$("$UBLK" stats -n $DEV_ID --json)
    local same=0; cmp -s $DEV_B /tmp/back3.img && same=1
    echo "$(( $(jq -r .bytes_fetched <<<"$st") - f0 )) $(jq -r .reads_through <<<"$st") $same"
    del $DEV_ID >/dev/null
}
R=($(scan_then_hot reuse)); echo "# --admit reuse: bytes the hot set's re-read fetched after the scan, reads through, same: ${R[*]}"
eq "--admit reuse: the hot set is all hits after the scan (nothing fetched)" 0 "${R[0]}"
check "--admit reuse: the scan was read through, not cached" test "${R[1]:-0}" -ge 60
eq "--admit reuse: the device reads as the backing store" 1 "${R[2]}"
A=($(scan_then_hot all)); echo "# --admit all: bytes the hot set's re-read fetched after the scan, reads through, same: ${A[*]}"
check "--admit all: the scan evicted the hot set (half of it or more is fetched again)" test "${A[0]:-0}" -ge $((2 << 20))
eq "--admit all: the device reads as the backing store" 1 "${A[2]}"
expect_error "--admit of another target" "applies to the cache target only" "$UBLK" add -t null --admit all
section "write-through onto a full cache file system: the writes stand on the backing store"
# ext4 of 8 MiB on a loop device for the cache file (a full file system, not a
# mapping that would fault), 24 MiB written through it.
truncate -s 8M /tmp/wtfs.img; truncate -s 64M /tmp/back4.img
dd if=/dev/urandom of=/tmp/src4 bs=1M count=24 status=none
mkdir -p /mnt/wt
if L=$(losetup --find --show /tmp/wtfs.img) && check "ext4 of 8 MiB for the cache ($L)" bash -c "mkfs.ext4 -q -F $L && mount -t ext4 $L /mnt/wt"; then
    if add -t cache --backing /tmp/back4.img --cache /mnt/wt/c --bitmap $C/w4.bitmap --write-mode through; then
        check "24 MiB written through: every write succeeds" dd if=/tmp/src4 of=$DEV_B bs=1M oflag=direct,sync status=none
        check "the backing store holds them" cmp -n $((24 << 20)) /tmp/src4 /tmp/back4.img
        sleep 1.2
        check "the writes whose cache copy failed are counted" bash -c "$UBLK stats -n $DEV_ID --json | jq -e '.cache_copies_lost > 0'"
        # Their pages are not cached, and the full file system takes no fetch: the reads go through.
        check "read misses the full cache cannot take are served from the backing store" \
            bash -c "cmp <(dd if=$DEV_B bs=1M count=24 iflag=direct status=none) /tmp/src4"
        check "and counted as reads through" bash -c "$UBLK stats -n $DEV_ID --json | jq -e '.reads_through > 0'"
        check "del" del $DEV_ID
    else
        fail "add -t cache --write-mode through on a small file system" "$DEV_JSON"
    fi
    umount /mnt/wt; losetup -d $L
fi
expect_error "bad write mode" "write-mode must be" "$UBLK" add -t cache --backing /tmp/back1.img --cache $C/x --bitmap $C/y --write-mode sideways
expect_error "missing backing" "No such file" "$UBLK" add -t cache --backing /nope --cache $C/x --bitmap $C/y
expect_error "flush of a missing device" "no running server" "$UBLK" flush -n 7
eq "nothing left" "[]" "$("$UBLK" list)"
finish
