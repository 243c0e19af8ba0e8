# On the real driver: `hydrate` against nginx. The device's
# server fetches every missing page in the background (CachingFill.swift);
# once at 100% the device serves with nginx stopped, requesting nothing.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; CACHE=/var/tmp/ublk-cache
mkdir -p $WWW $CACHE /mnt/h
LOG=/var/log/nginx/access.log
lines() { cat $LOG 2>/dev/null | wc -l; }
# The whole device read past the page cache, compared with FILE.
cmp_device() { dd if="$1" bs=1M iflag=direct 2>/dev/null | cmp - "$2"; }
now() { cut -d' ' -f1 /proc/uptime; }
# holds A OP B: compares decimals (awk; the guest has no bc).
holds() { awk -v a="$1" -v b="$3" "BEGIN { exit !(a $2 b) }"; }

section "an ext4 image and a 16 MiB blob, served by nginx"
src=$(mktemp -d)
mkdir -p $src/d
for i in 1 2 3 4; do head -c $(( i * 1500000 + 4096 * i + 7 )) /dev/urandom > $src/d/blob$i; done
seq 1 100000 > $src/numbers.txt
(cd $src && sha256sum d/* numbers.txt) > /tmp/sums
truncate -s 40M $WWW/disk.img
check "mkfs.ext4 -d" mkfs.ext4 -q -F -d $src $WWW/disk.img
head -c 16M /dev/urandom > $WWW/blob.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img

section "hydrate to 100%, then nginx stopped: the device serves, nothing is requested"
rm -f $CACHE/h.*
if add -t http --url $URL --cache $CACHE/h.cache --bitmap $CACHE/h.bitmap; then
    ok "add -t http"
    timeout 300 "$UBLK" hydrate -n $DEV_ID > /tmp/h.out 2>/tmp/h.err; rc=$?
    eq "hydrate exits 0" 0 "$rc"
    [ $rc -eq 0 ] || cat /tmp/h.err
    echo "# $(wc -l < /tmp/h.out) progress lines; last: $(tail -n 1 /tmp/h.out)"
    check "every line is JSON with pages present, total, percent, bytes fetched" \
        jq -e 'has("pages_present") and has("pages_total") and has("percent") and has("bytes_fetched")' /tmp/h.out
    check "the last line: done, 100%, every page, persisted" \
        bash -c "tail -n 1 /tmp/h.out | jq -e '.state == \"done\" and .percent == 100 and .pages_present == .pages_total and .persisted'"
    check "coalesced: far fewer requests than pages" \
        bash -c "tail -n 1 /tmp/h.out | jq -e '.requests > 0 and .requests * 64 <= .pages_total'"
    sleep 1.5  # stats are published once a second
    eq "list shows 100% hydrated" 100 "$("$UBLK" list -n $DEV_ID | jq -r '.[0].hydrated_percent')"
    R=$(lines)
    check "nginx stopped" nginx-stop
    check "cmp of the whole device (O_DIRECT) with the image, nginx stopped" cmp_device $DEV_B $WWW/disk.img
    check "mount and checksums, nginx stopped" bash -c "mount -t ext4 -o ro $DEV_B /mnt/h && cd /mnt/h && sha256sum -c --quiet /tmp/sums && cd / && umount /mnt/h"
    eq "nothing was requested (nginx's log has no new line)" "$R" "$(lines)"
    check "no fetch failed (server log)" bash -c "! grep -q 'fetch of bytes' /run/ublk-http/ublk$DEV_ID.log 2>/dev/null"
    eq "hydrate again: at once, nothing to fetch" 0 "$(timeout 30 "$UBLK" hydrate -n $DEV_ID | tail -n 1 | jq -r .requests)"
    check "nginx again" nginx-start $WWW 8080
    del $DEV_ID >/dev/null
else
    fail "add -t http" "$DEV_JSON"
fi

section "reads during hydration return the image's bytes (-q 2: misses of both queues go to the home)"
rm -f $CACHE/r.*
if add -t http --url $URL --cache $CACHE/r.cache --bitmap $CACHE/r.bitmap -q 2; then
    # 1 MiB/s: the reads below (and their readahead) leave it well over 10 s.
    timeout 300 "$UBLK" hydrate -n $DEV_ID --rate 1M/s > /tmp/r.out 2>&1 &
    H=$!
    sleep 0.5
    # The reads' own misses (and their readahead) may finish the rest sooner
    # on a busy host: what counts is that the hydration runs as they start.
    eq "hydrating as the reads start" running "$("$UBLK" hydrate -n $DEV_ID --detach | jq -r .state)"
    check "mount and checksums while hydrating" bash -c "mount -t ext4 -o ro $DEV_B /mnt/h && cd /mnt/h && sha256sum -c --quiet /tmp/sums && cd / && umount /mnt/h"
    check "a region read (O_DIRECT) while hydrating matches" \
        bash -c "cmp <(dd if=$DEV_B bs=64k skip=500 count=40 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=64k skip=500 count=40 2>/dev/null)"
    wait $H; rc=$?
    eq "hydrate --rate 1M/s exits 0" 0 "$rc"
    check "cmp of the whole device afterwards" cmp_device $DEV_B $WWW/disk.img
    del $DEV_ID >/dev/null
else
    fail "add for reads during hydration" "$DEV_JSON"
fi

section "--rate bounds the rate: 16 MiB at 4M/s takes at least 3 s"
rm -f $CACHE/b.*
if add -t http --url http://127.0.0.1:8080/blob.img --cache $CACHE/b.cache --bitmap $CACHE/b.bitmap; then
    sleep 0.5
    P0=$("$UBLK" hydrate -n $DEV_ID --stop | jq -r .pages_present)  # pages the kernel's partition scan read
    t0=$(now)
    timeout 120 "$UBLK" hydrate -n $DEV_ID --rate 4M/s > /tmp/b.out; rc=$?
    t=$(awk -v a="$(now)" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
    echo "# 16 MiB at 4M/s: $t s ($P0 pages present before); $(tail -n 1 /tmp/b.out)"
    eq "exits 0" 0 "$rc"
    check "took at least 3 s" holds "$t" ">=" 3
    check "and not far more (under 12 s)" holds "$t" "<" 12
    check "the device is the blob" cmp_device $DEV_B $WWW/blob.img
    del $DEV_ID >/dev/null
else
    fail "add for --rate" "$DEV_JSON"
fi

section "Ctrl-C stops the watching, not the hydration; --stop stops it"
rm -f $CACHE/c.*
if add -t http --url $URL --cache $CACHE/c.cache --bitmap $CACHE/c.bitmap; then
    # In the foreground: a background job of a script ignores SIGINT.
    timeout -s INT 1.5 "$UBLK" hydrate -n $DEV_ID --rate 1M/s > /tmp/c.out 2>&1
    eq "SIGINT ends the watcher" 124 "$?"
    eq "the hydration goes on in the server" running "$("$UBLK" hydrate -n $DEV_ID --detach | jq -r .state)"
    "$UBLK" hydrate -n $DEV_ID > /tmp/c2.out 2>/tmp/c2.err &
    W=$!
    sleep 0.5
    eq "hydrate --stop" stopped "$("$UBLK" hydrate -n $DEV_ID --stop | jq -r .state)"
    wait $W; rc=$?
    check "a watcher exits non-zero, one line saying so" bash -c "[ $rc -ne 0 ] && [ \$(wc -l < /tmp/c2.err) -eq 1 ] && grep -q 'hydration stopped' /tmp/c2.err"
    sleep 1  # runs in flight at the stop finish
    R=$(lines); sleep 1.5
    eq "nothing more requested after --stop" "$R" "$(lines)"
    P=$("$UBLK" hydrate -n $DEV_ID --stop | jq -r .percent)
    check "stopped short of 100% ($P)" holds "$P" "<" 100
    sleep 1.5  # stats are published once a second
    L=$("$UBLK" list -n $DEV_ID | jq -r '.[0].hydrated_percent')
    check "list shows the same partial percentage ($L)" holds "$L" "==" "$P"
    del $DEV_ID >/dev/null
else
    fail "add for stop" "$DEV_JSON"
fi

section "kill -9 during hydration: what was fetched stays, the device reads the image"
rm -f $CACHE/x.*
if add -t http --url $URL --cache $CACHE/x.cache --bitmap $CACHE/x.bitmap; then
    check "hydrate --detach --rate 4M/s" bash -c "$UBLK hydrate -n $DEV_ID --rate 4M/s --detach | jq -e '.state == \"running\"'"
    sleep 3
    kill -9 $DEV_PID
    wait_for 30 dead $DEV_PID
    check "del the dead device" del $DEV_ID
    if add -t http --url $URL --cache $CACHE/x.cache --bitmap $CACHE/x.bitmap; then
        P=$("$UBLK" hydrate -n $DEV_ID --stop | jq -r .pages_present)
        echo "# pages present after kill -9 and add: $P of 10240"
        check "pages hydrated before the kill are still present" test "$P" -gt 1000
        check "the device reads the image" cmp_device $DEV_B $WWW/disk.img
        eq "hydrate to the end" 0 "$(timeout 300 "$UBLK" hydrate -n $DEV_ID >/dev/null; echo $?)"
        del $DEV_ID >/dev/null
    else
        fail "add after kill -9" "$DEV_JSON"
    fi
else
    fail "add for kill -9" "$DEV_JSON"
fi

section "http --writable: local writes are never fetched over"
rm -f $CACHE/w.*
if add -t http --url $URL --cache $CACHE/w.cache --bitmap $CACHE/w.bitmap --writable; then
    cp $WWW/disk.img /tmp/expected.img
    head -c 3M /dev/urandom > /tmp/pattern
    # Whole pages (claimed, never fetched), part of a page, an unaligned span.
    for span in "0 1048576" "20972520 5000" "34603520 3145216"; do
        set -- $span
        check "write $2 bytes at $1" bash -c "head -c $2 /tmp/pattern | dd of=$DEV_B bs=64k iflag=fullblock oflag=seek_bytes seek=$1 conv=notrunc,fsync 2>/dev/null"
        head -c $2 /tmp/pattern | dd of=/tmp/expected.img bs=64k iflag=fullblock oflag=seek_bytes seek=$1 conv=notrunc 2>/dev/null
    done
    timeout 300 "$UBLK" hydrate -n $DEV_ID > /tmp/w.out; rc=$?
    eq "hydrate exits 0" 0 "$rc"
    check "nginx stopped" nginx-stop
    check "the device: the image, with the local writes in place" cmp_device $DEV_B /tmp/expected.img
    check "nginx again" nginx-start $WWW 8080
    del $DEV_ID >/dev/null
else
    fail "add --writable" "$DEV_JSON"
fi

section "the cache target: hydrate copies the backing store into the cache"
cp $WWW/blob.img /var/tmp/back.img
rm -f $CACHE/k.*
if add -t cache --backing /var/tmp/back.img --cache $CACHE/k.cache --bitmap $CACHE/k.bitmap; then
    timeout 300 "$UBLK" hydrate -n $DEV_ID > /tmp/k.out; rc=$?
    eq "hydrate exits 0" 0 "$rc"
    check "100%, every page" bash -c "tail -n 1 /tmp/k.out | jq -e '.percent == 100 and .pages_present == .pages_total'"
    check "the device is the backing store" cmp_device $DEV_B /var/tmp/back.img
    del $DEV_ID >/dev/null
else
    fail "add -t cache" "$DEV_JSON"
fi

section "bad input: one line, non-zero"
expect_error "a missing device" "no such device: ublk77" "$UBLK" hydrate -n 77
expect_error "--rate 0" "bad --rate '0'" "$UBLK" hydrate -n 0 --rate 0
expect_error "--rate fast" "bad --rate 'fast'" "$UBLK" hydrate -n 0 --rate fast
if add -t null --size 64M; then
    expect_error "a null device" "null device: only http and cache" "$UBLK" hydrate -n $DEV_ID
    expect_error "--stop on a null device" "null device" "$UBLK" hydrate -n $DEV_ID --stop
    del $DEV_ID >/dev/null
else
    fail "add -t null" "$DEV_JSON"
fi
truncate -s 8M /var/tmp/loop.img
if add -t loop -f /var/tmp/loop.img; then
    expect_error "a loop device" "loop device: only http and cache" "$UBLK" hydrate -n $DEV_ID
    del $DEV_ID >/dev/null
else
    fail "add -t loop" "$DEV_JSON"
fi
rm -f $CACHE/m.*
if add -t http --url $URL --cache $CACHE/m.cache --bitmap $CACHE/m.bitmap --cache-max-size 8M; then
    expect_error "a cache bounded below the image" "cache-max-size" "$UBLK" hydrate -n $DEV_ID
    del $DEV_ID >/dev/null
else
    fail "add --cache-max-size" "$DEV_JSON"
fi
eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop

section "--connections 1: a read during hydration is served while it runs, behind fill runs of 1 MiB at most"
check "nginx (again)" nginx-start $WWW 8080
head -c 64M /dev/urandom > $WWW/one.img
rm -f $CACHE/one.*
if add -t http --url http://127.0.0.1:8080/one.img --cache $CACHE/one.cache --bitmap $CACHE/one.bitmap --connections 1 --readahead 0; then
    sleep 1  # the kernel's partition scan
    L0=$(lines)
    # 16M/s: runs would be 4 MiB (a quarter second's worth) but for the one-connection bound; about 4 s in all.
    check "hydrate --detach --rate 16M/s" bash -c "$UBLK hydrate -n $DEV_ID --rate 16M/s --detach | jq -e '.state == \"running\"'"
    sleep 0.5
    # A page near the end, far from the fill's cursor: a miss of its own (no readahead: exactly that page).
    check "a read at 60 MiB during the hydration returns the image's bytes" \
        bash -c "cmp <(dd if=$DEV_B bs=4k skip=15360 count=1 iflag=direct 2>/dev/null) <(dd if=$WWW/one.img bs=4k skip=15360 count=1 2>/dev/null)"
    eq "the hydration still runs when the read has returned" running "$("$UBLK" hydrate -n $DEV_ID --detach | jq -r .state)"
    timeout 120 "$UBLK" hydrate -n $DEV_ID > /tmp/one.out; eq "hydrate to the end" 0 "$?"
    # nginx's log, in the order it served them (one connection): "first length" of each range.
    tail -n +$((L0 + 1)) $LOG | grep '"GET /one.img' \
        | awk 'match($0, /bytes=[0-9]+-[0-9]+/) { split(substr($0, RSTART + 6, RLENGTH - 6), a, "-"); print a[1], a[2] - a[1] + 1 }' > /tmp/one.ranges
    MAX=$(awk '$2 > m { m = $2 } END { print m + 0 }' /tmp/one.ranges)
    echo "# --connections 1: $(wc -l < /tmp/one.ranges) range requests, the longest $MAX bytes"
    check "fill runs of 1 MiB at most (one readahead unit), not 4 MiB" test "$MAX" -gt 0 -a "$MAX" -le 1048576
    AT=$(grep -n '^62914560 4096$' /tmp/one.ranges | cut -d: -f1)
    check "the read's own request is in nginx's log" test -n "$AT"
    check "fill requests came after it: it did not wait for the hydration" test "${AT:-999999}" -lt "$(wc -l < /tmp/one.ranges)"
    check "the device is the image" cmp_device $DEV_B $WWW/one.img
    del $DEV_ID >/dev/null
else
    fail "add --connections 1" "$DEV_JSON"
fi
rm -f $CACHE/one.* $WWW/one.img
eq "nothing left after --connections 1" "[]" "$("$UBLK" list)"
nginx-stop

section "a hydrated device needs no remote: recovered, and added again, with nginx stopped"
check "nginx again" nginx-start $WWW 8080
rm -f $CACHE/o.*
OOPTS="--url $URL --cache $CACHE/o.cache --bitmap $CACHE/o.bitmap"
# cmp_device, bounded: a read may wait in a device that no server serves.
cmp_within() { timeout 120 bash -c "dd if=$1 bs=1M iflag=direct 2>/dev/null | cmp - $2"; }
if add -t http $OOPTS --recovery; then
    O=$DEV_ID
    check "hydrate to 100%, persisted" bash -c "timeout 300 $UBLK hydrate -n $O | tail -n 1 | jq -e '.percent == 100 and .persisted'"
    check "nginx stopped" nginx-stop
    kill -9 $DEV_PID; wait_for 30 dead $DEV_PID
    R=$(timeout 60 "$UBLK" recover -n $O 2>&1)
    if [ $? -eq 0 ]; then ok "recover with nginx stopped"; else fail "recover with nginx stopped" "$R"; fi
    eq "list says it serves the complete cache" "unreachable, serving the complete cache" \
        "$("$UBLK" list -n $O | jq -r '.[0].target_options.remote')"
    eq "with the image's size" "$(stat -c %s $WWW/disk.img)" "$("$UBLK" list -n $O | jq -r '.[0].target_options.image_size')"
    check "cmp of the whole device with the image" cmp_within /dev/ublkb$O $WWW/disk.img
    check "del" del $O
    if add -t http $OOPTS; then
        ok "add again with the same --cache and --bitmap, nginx stopped"
        eq "list says it serves the complete cache" "unreachable, serving the complete cache" \
            "$("$UBLK" list -n $DEV_ID | jq -r '.[0].target_options.remote')"
        check "cmp of the whole device with the image" cmp_within $DEV_B $WWW/disk.img
        check "mount and checksums" bash -c "mount -t ext4 -o ro $DEV_B /mnt/h && cd /mnt/h && sha256sum -c --quiet /tmp/sums && cd / && umount /mnt/h"
        del $DEV_ID >/dev/null
    else
        fail "add again with nginx stopped" "$DEV_JSON"
    fi
else
    fail "add --recovery for the hydrated device" "$DEV_JSON"
fi

section "a partly hydrated cache with nginx stopped: add is one line"
check "nginx again" nginx-start $WWW 8080
rm -f $CACHE/q.*
if add -t http --url $URL --cache $CACHE/q.cache --bitmap $CACHE/q.bitmap; then
    check "read part of the device" dd if=$DEV_B of=/dev/null bs=1M count=4 iflag=direct
    del $DEV_ID >/dev/null
    check "nginx stopped" nginx-stop
    check "the cache is partly hydrated" bash -c "$UBLK status --bitmap $CACHE/q.bitmap --cache $CACHE/q.cache | jq -e '.pages_present > 0 and .pages_present < .pages_total'"
    expect_error "add of the partly hydrated cache" "127\.0\.0\.1:8080/disk\.img: cannot connect" \
        "$UBLK" add -t http --url $URL --cache $CACHE/q.cache --bitmap $CACHE/q.bitmap
    eq "nothing left" "[]" "$("$UBLK" list)"
else
    fail "add for the partly hydrated cache" "$DEV_JSON"
fi

finish
