# On the real driver: a cache file lost,
# replaced or truncated between runs; a local overlay whose dirty list was
# cleared; the cache target's backing replaced while the device was down.
# The bitmap never vouches for bytes that are not its cache file's: reads
# return the source's bytes (never zeros), or `add` refuses with one line
# where local or write-back pages would be lost.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/bind
mkdir -p $WWW $C
head -c $((16 << 20)) /dev/urandom > $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
OPTS="--url $URL --cache $C/d.cache --bitmap $C/d.bitmap"
state() { echo "$DEV_JSON" | jq -r .target_options.cache_state; }

# warm: add, read the first 8 MiB (fetched into the cache), del.
warm() {
    if add -t http $OPTS "$@"; then
        dd if=$DEV_B of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null
        sleep 1.5 # the bitmap is persisted
        del $DEV_ID >/dev/null
    else
        fail "add to warm the cache" "$DEV_JSON"
    fi
}

# after NAME: add again; the cache starts afresh and the device is the object.
after() {
    if add -t http $OPTS; then
        check "$1: the cache starts afresh, and says why" bash -c "echo '$(state)' | grep -qE 'afresh.*($2)'"
        check "$1: the device reads the object's bytes, never zeros" cmp $DEV_B $WWW/disk.img
        del $DEV_ID >/dev/null
    else
        fail "$1: add" "$DEV_JSON"
    fi
}

section "http: a warm cache is reused"
warm
if add -t http $OPTS; then
    eq "reused" reused "$(state)"
    check "reads the object" cmp $DEV_B $WWW/disk.img
    del $DEV_ID >/dev/null
fi

section "http: the cache file deleted between runs"
warm; rm -f $C/d.cache
after "deleted" "missing"

section "http: the cache file replaced by a file of random bytes of the same size"
warm
head -c "$(stat -c %s $C/d.cache)" /dev/urandom > $C/other; mv -f $C/other $C/d.cache
after "replaced (same size)" "trailer"
warm
head -c $((16 << 20)) /dev/urandom > $C/other; mv -f $C/other $C/d.cache
after "replaced (the image's size)" "trailer|truncated"

section "http: the cache file truncated"
warm; truncate -s 4M $C/d.cache
after "truncated" "truncated"
warm; truncate -s 0 $C/d.cache; truncate -s $(( (16 << 20) + 4096 )) $C/d.cache
after "truncated and grown back" "trailer"

section "http --writable: a lost cache file with local pages is refused, one line"
rm -f $C/d.*
if add -t http $OPTS --writable; then
    head -c 8192 /dev/urandom > /tmp/w
    check "write two pages" dd if=/tmp/w of=$DEV_B bs=4096 seek=10 oflag=direct conv=fsync
    del $DEV_ID >/dev/null
    cp $C/d.cache /tmp/d.cache.keep
    rm -f $C/d.cache
    expect_error "deleted: add refuses" "missing.*locally written pages.*refusing" "$UBLK" add -t http $OPTS --writable
    head -c "$(stat -c %s /tmp/d.cache.keep)" /dev/urandom > $C/d.cache
    expect_error "replaced: add refuses" "trailer.*locally written pages.*refusing" "$UBLK" add -t http $OPTS --writable
    cp /tmp/d.cache.keep $C/d.cache; truncate -s 1M $C/d.cache
    expect_error "truncated: add refuses" "truncated.*locally written pages.*refusing" "$UBLK" add -t http $OPTS --writable
    cp /tmp/d.cache.keep $C/d.cache
    if add -t http $OPTS --writable; then
        check "the files put back: the written pages are there" bash -c "cmp <(dd if=$DEV_B bs=4096 skip=10 count=2 iflag=direct 2>/dev/null) /tmp/w"
        del $DEV_ID >/dev/null
    else
        fail "add with the files put back" "$DEV_JSON"
    fi
else
    fail "add --writable" "$DEV_JSON"
fi

section "http --writable: local pages outlive a cleared dirty list"
# Written, then `sync` (the dirty list is empty now), then the remote changes:
# the overlay must not be wiped.
check "sync of the stopped overlay clears its dirty list" "$UBLK" sync --dirty-bitmap $C/d.bitmap.dirty --cache $C/d.cache --to /var/tmp/replica.img
eq "nothing dirty" 0 "$("$UBLK" dirty --dirty-bitmap $C/d.bitmap.dirty | jq -r .pages)"
check "status lists the local pages" bash -c "$UBLK status --bitmap $C/d.bitmap --cache $C/d.cache | jq -e '.pages_local == 2 and .cache_file == \"ok\"'"
cp $WWW/disk.img /tmp/old.img
dd if=/dev/urandom of=$WWW/disk.img bs=1M seek=3 count=1 conv=notrunc 2>/dev/null
touch -d '2031-01-01 00:00:00' $WWW/disk.img
expect_error "the remote changed: add --writable refuses" "remote image changed.*2 locally written pages.*refusing" "$UBLK" add -t http $OPTS --writable
expect_error "and without --writable too" "2 locally written pages.*--writable" "$UBLK" add -t http $OPTS
expect_error "prefetch refuses as well" "remote image changed.*locally written pages" "$UBLK" prefetch $OPTS
cp /tmp/old.img $WWW/disk.img
touch -d '2030-06-01 00:00:00' $WWW/disk.img
rm -f $C/d.*

section "cache: the backing file replaced by another (same size) while down"
CK="--cache $C/k.cache --bitmap $C/k.bitmap"
head -c $((16 << 20)) /dev/urandom > /var/tmp/back.img
if add -t cache --backing /var/tmp/back.img $CK; then
    check "read it all (cached)" cmp $DEV_B /var/tmp/back.img
    sleep 1.5
    del $DEV_ID >/dev/null
fi
head -c $((16 << 20)) /dev/urandom > /var/tmp/back.new; mv -f /var/tmp/back.new /var/tmp/back.img
if add -t cache --backing /var/tmp/back.img $CK; then
    check "another file: afresh, and says why" bash -c "echo '$(state)' | grep -q 'afresh.*replaced'"
    check "the device reads the new backing" cmp $DEV_B /var/tmp/back.img
    sleep 1.5
    del $DEV_ID >/dev/null
else
    fail "add after the backing was replaced" "$DEV_JSON"
fi
dd if=/dev/urandom of=/var/tmp/back.img bs=1M count=16 conv=notrunc 2>/dev/null
if add -t cache --backing /var/tmp/back.img $CK; then
    check "rewritten in place (same inode): afresh, and says why" bash -c "echo '$(state)' | grep -q 'afresh.*differs'"
    check "the device reads the rewritten backing" cmp $DEV_B /var/tmp/back.img
    del $DEV_ID >/dev/null
else
    fail "add after the backing was rewritten" "$DEV_JSON"
fi

section "cache --write-mode back: pages not written back, then the backing replaced: refused"
if add -t cache --backing /var/tmp/back.img $CK --write-mode back; then
    check "read it all" cmp $DEV_B /var/tmp/back.img
    # Scattered 4k writes (one-page write-back runs, copied one at a time:
    # a backlog builds), the server killed under them.
    # Time-based: still writing when the server is killed (a run of fixed size
    # may finish, and be written back, before the kill).
    fio --name=wb --filename=$DEV_B --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --offset=4M --size=8M \
        --iodepth=16 --randseed=7 --time_based --runtime=60 --output=/tmp/fio-wb.txt >/dev/null 2>&1 &
    FIO=$!
    sleep 3
    kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
    wait_for 30 dead $FIO; kill -9 $FIO 2>/dev/null; wait $FIO 2>/dev/null
    del $DEV_ID >/dev/null 2>&1
    echo "# fio before the kill: $(grep -m1 -E 'write: IOPS|err=' /tmp/fio-wb.txt)"
    echo "# status: $("$UBLK" status --bitmap $C/k.bitmap 2>&1 | head -c 400)"
    check "pages await write-back" bash -c "$UBLK status --bitmap $C/k.bitmap | jq -e '.pages_writeback > 0'"
    mv /var/tmp/back.img /var/tmp/back.keep # the same inode, put back below
    head -c $((16 << 20)) /dev/urandom > /var/tmp/back.new; mv -f /var/tmp/back.new /var/tmp/back.img
    expect_error "another backing: add refuses" "replaced.*not written back.*refusing" "$UBLK" add -t cache --backing /var/tmp/back.img $CK --write-mode back
    mv -f /var/tmp/back.keep /var/tmp/back.img
    mv $C/k.cache $C/k.cache.keep
    expect_error "a lost cache file with write-back pages: refused" "missing.*not written back.*refusing" "$UBLK" add -t cache --backing /var/tmp/back.img $CK --write-mode back
    mv $C/k.cache.keep $C/k.cache
    if add -t cache --backing /var/tmp/back.img $CK --write-mode back; then
        check "the files put back: flush writes the pages back" bash -c "timeout 300 $UBLK flush -n $DEV_ID | jq -e '.writeback_pages == 0'"
        check "and the backing holds the device's bytes" cmp $DEV_B /var/tmp/back.img
        del $DEV_ID >/dev/null
    else
        fail "add with the original backing back" "$DEV_JSON"
    fi
else
    fail "add --write-mode back" "$DEV_JSON"
fi
eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop
finish
