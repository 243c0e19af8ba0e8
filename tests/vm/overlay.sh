# On the real driver: a writable http overlay with dirty tracking,
# `dirty`, `sync --to REPLICA`, writes racing a sync, persistence across
# del/add and kill -9.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/ov
mkdir -p $WWW $C
head -c $((32 << 20)) /dev/urandom > $WWW/disk.img
ORIG=$(sha256sum < $WWW/disk.img)
cp $WWW/disk.img /var/tmp/replica.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
OPTS="--url $URL --cache $C/d.cache --bitmap $C/d.bitmap --writable"
LOG=/var/log/nginx/access.log
ranges() { grep -c "GET /disk.img HTTP/1.1\" 206" $LOG || true; }
dirty_json() { "$UBLK" dirty "$@" | jq -c '[.extents[] | [.offset, .length]]'; }

section "writes at known offsets are listed exactly"
if add -t http $OPTS; then
    eq "device is writable" 0 "$(blockdev --getro $DEV_B)"
    eq "nothing dirty yet" "[]" "$(dirty_json -n $DEV_ID)"
    head -c 4096 /dev/urandom > /tmp/p1; head -c 6144 /dev/urandom > /tmp/p2
    check "write one page at 8K" dd if=/tmp/p1 of=$DEV_B bs=4096 seek=2 oflag=direct
    check "write 6K straddling two pages at 1M+2K" dd if=/tmp/p2 of=$DEV_B bs=512 seek=2052 oflag=direct
    check "discard 64K at 4M" blkdiscard -o 4194304 -l 65536 $DEV_B
    eq "dirty lists exactly those pages" "[[8192,4096],[1048576,8192],[4194304,65536]]" "$(dirty_json -n $DEV_ID)"
    check "written page reads back" bash -c "cmp <(dd if=$DEV_B bs=4096 skip=2 count=1 iflag=direct 2>/dev/null) /tmp/p1"
    check "straddling write reads back" bash -c "cmp <(dd if=$DEV_B bs=512 skip=2052 count=12 iflag=direct 2>/dev/null) /tmp/p2"
    check "bytes around it are the object's" bash -c "cmp <(dd if=$DEV_B bs=512 skip=2048 count=4 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=512 skip=2048 count=4 2>/dev/null)"
    check "discarded range reads zeros" bash -c "cmp <(dd if=$DEV_B bs=64k skip=64 count=1 iflag=direct 2>/dev/null) <(head -c 65536 /dev/zero)"
    check "untouched data is the object's" bash -c "cmp <(dd if=$DEV_B bs=1M skip=8 count=8 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=1M skip=8 count=8 2>/dev/null)"
    check "del" del $DEV_ID
else
    fail "add --writable" "$DEV_JSON"
fi

section "writes survive del and add; the server's object is unchanged"
eq "offline: dirty --dirty-bitmap lists the same" "[[8192,4096],[1048576,8192],[4194304,65536]]" "$(dirty_json --dirty-bitmap $C/d.bitmap.dirty)"
expect_error "the overlay is refused without --writable" "locally written pages.*--writable" "$UBLK" add -t http --url $URL --cache $C/d.cache --bitmap $C/d.bitmap
if add -t http $OPTS; then
    check "written page still there" bash -c "cmp <(dd if=$DEV_B bs=4096 skip=2 count=1 iflag=direct 2>/dev/null) /tmp/p1"
    eq "dirty list persisted" "[[8192,4096],[1048576,8192],[4194304,65536]]" "$(dirty_json -n $DEV_ID)"
    eq "the server's object is unchanged" "$ORIG" "$(sha256sum < $WWW/disk.img)"

    section "sync copies exactly the dirty extents"
    S=$("$UBLK" sync -n $DEV_ID --to /var/tmp/replica.img)
    eq "sync copied 3 extents" 3 "$(echo "$S" | jq -r .extents)"
    eq "sync copied 77824 bytes" 77824 "$(echo "$S" | jq -r .bytes)"
    check "replica equals the device" cmp $DEV_B /var/tmp/replica.img
    eq "nothing dirty after sync" "[]" "$(dirty_json -n $DEV_ID)"

    section "writes racing a sync stay dirty"
    B=$(ranges)
    check "dirty 16 MiB" dd if=/dev/urandom of=$DEV_B bs=1M seek=12 count=16 oflag=direct
    eq "whole-page writes fetch nothing" "$B" "$(ranges)"
    "$UBLK" sync -n $DEV_ID --to /var/tmp/replica.img > /tmp/sync.json 2>&1 &
    SP=$!
    n=0
    while alive $SP; do
        head -c 4096 /dev/urandom | dd of=$DEV_B bs=4096 seek=100 oflag=direct 2>/dev/null; n=$((n + 1))
    done
    wait $SP; eq "the racing sync succeeded" 0 "$?"
    echo "# $n writes raced the sync"
    check "the page written during the sync is still dirty" bash -c "$UBLK dirty -n $DEV_ID | jq -e '.extents | map(select(.offset <= 409600 and .offset + .length >= 413696)) | length == 1'"
    check "a second sync" "$UBLK" sync -n $DEV_ID --to /var/tmp/replica.img
    check "replica equals the device" cmp $DEV_B /var/tmp/replica.img

    section "dirty --clear"
    check "write a page" dd if=/tmp/p1 of=$DEV_B bs=4096 seek=5 oflag=direct
    eq "listed" "[[20480,4096]]" "$(dirty_json -n $DEV_ID --clear)"
    eq "cleared" "[]" "$(dirty_json -n $DEV_ID)"

    section "a FLUSHed write survives kill -9"
    check "write with fsync" dd if=/tmp/p2 of=$DEV_B bs=512 seek=800 count=12 oflag=direct conv=fsync
    kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
    del $DEV_ID >/dev/null 2>&1
    if add -t http $OPTS; then
        check "the flushed write is there" bash -c "cmp <(dd if=$DEV_B bs=512 skip=800 count=12 iflag=direct 2>/dev/null) /tmp/p2"
        check "and listed dirty" bash -c "$UBLK dirty -n $DEV_ID | jq -e '.extents | map(select(.offset <= 409600 and .offset + .length >= 415744)) | length == 1'"
        section "an unflushed write's dirty bit is persisted within seconds (no FLUSH)"
        check "page 2 is clean before" bash -c "$UBLK dirty -n $DEV_ID | jq -e '.extents | map(select(.offset <= 8192 and .offset + .length >= 12288)) | length == 0'"
        check "rewrite a present, clean page" dd if=/tmp/p1 of=$DEV_B bs=4096 seek=2 oflag=direct
        sleep 2.5
        kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
        del $DEV_ID >/dev/null 2>&1
        if add -t http $OPTS; then
            check "listed dirty after kill -9" bash -c "$UBLK dirty -n $DEV_ID | jq -e '.extents | map(select(.offset <= 8192 and .offset + .length >= 12288)) | length == 1'"
            del $DEV_ID >/dev/null
        else
            fail "add after the second kill -9" "$DEV_JSON"
        fi
    else
        fail "add after kill -9" "$DEV_JSON"
    fi
else
    fail "add --writable again" "$DEV_JSON"
fi

section "offline sync of a stopped device"
cp $WWW/disk.img /var/tmp/replica2.img
check "sync --dirty-bitmap --cache" "$UBLK" sync --dirty-bitmap $C/d.bitmap.dirty --cache $C/d.cache --to /var/tmp/replica2.img
if add -t http $OPTS; then
    eq "nothing dirty after the offline sync" "[]" "$(dirty_json -n $DEV_ID)"
    del $DEV_ID >/dev/null
fi
check "offline replica has the flushed write" bash -c "cmp <(dd if=/var/tmp/replica2.img bs=512 skip=800 count=12 2>/dev/null) /tmp/p2"

section "FUA writes complete with their byte count (a shorter count makes the kernel resend them)"
if add -t http $OPTS; then
    head -c 8192 /dev/urandom > /tmp/fua
    check "two 4k FUA writes (O_DIRECT, O_DSYNC), bounded" timeout 60 dd if=/tmp/fua of=$DEV_B bs=4k seek=3000 count=2 oflag=direct,dsync
    check "a 512 B FUA write inside a page, bounded" timeout 60 dd if=/tmp/fua of=$DEV_B bs=512 seek=$((3100 * 8 + 3)) count=1 oflag=direct,dsync
    check "they read back" bash -c "cmp <(dd if=$DEV_B bs=4k skip=3000 count=2 iflag=direct 2>/dev/null) /tmp/fua"
    del $DEV_ID >/dev/null
else
    fail "add for FUA writes" "$DEV_JSON"
fi

section "bad inputs"
expect_error "dirty needs -n or --dirty-bitmap" "either -n" "$UBLK" dirty
expect_error "dirty of a missing device" "no running server" "$UBLK" dirty -n 5
if add -t null --size 16M; then
    expect_error "dirty on a target without tracking" "not supported" "$UBLK" dirty -n $DEV_ID
    del $DEV_ID >/dev/null
fi
eq "the server's object is still unchanged" "$ORIG" "$(sha256sum < $WWW/disk.img)"
eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop
finish
