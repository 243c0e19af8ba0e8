# On the real driver: the http target against nginx in the guest.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; CACHE=/var/tmp/ublk-cache
mkdir -p $WWW $CACHE /mnt/h
LOG=/var/log/nginx/access.log
# Range GETs of the image logged so far (nginx logs 206 for each).
ranges() { grep -c "GET /$1 HTTP/1.1\" 206" $LOG || true; }

section "an ext4 image made by the test, served by nginx"
src=$(mktemp -d)
mkdir -p $src/d
for i in 1 2 3 4 5 6; do head -c $(( i * 1500000 + 4096 * i + 7 )) /dev/urandom > $src/d/blob$i; done
seq 1 100000 > $src/numbers.txt
(cd $src && sha256sum d/* numbers.txt) > /tmp/sums
truncate -s 96M $WWW/disk.img
check "mkfs.ext4 -d" mkfs.ext4 -q -F -d $src $WWW/disk.img
# An object whose size is not a multiple of 512.
head -c 1000003 /dev/urandom > $WWW/odd.bin
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img

section "add -t http, mount, checksums, cmp"
if add -t http --url $URL --cache $CACHE/disk.cache --bitmap $CACHE/disk.bitmap; then
    ok "add -t http"
    eq "read-only device" 1 "$(blockdev --getro $DEV_B)"
    eq "device size is the object's" $((96 << 20)) "$(blockdev --getsize64 $DEV_B)"
    eq "cache state fresh" fresh "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "mount -o ro" mount -t ext4 -o ro $DEV_B /mnt/h
    check "every file's checksum matches" bash -c "cd /mnt/h && sha256sum -c /tmp/sums"
    check "umount" umount /mnt/h
    check "cmp of the whole device against the object" cmp $DEV_B $WWW/disk.img
    check "cache file is 0600" bash -c "[ \"\$(stat -c %a $CACHE/disk.cache)\" = 600 ] && [ \"\$(stat -c %a $CACHE/disk.bitmap)\" = 600 ]"
    check "writes are refused" bash -c "! dd if=/dev/zero of=$DEV_B bs=4k count=1 oflag=direct 2>/dev/null"
    sleep 1.5  # stats are published once a second
    S=$("$UBLK" list -n $DEV_ID)
    eq "list shows the http target" http "$(echo "$S" | jq -r '.[0].target')"
    check "list shows cache statistics" bash -c "echo '$S' | jq -e '.[0].stats.misses > 0 and .[0].stats.bytes_fetched > 0'"
    check "stats -n prints Prometheus text" bash -c "$UBLK stats -n $DEV_ID | grep -q '^ublk_http_cache_hits_total{device=\"ublkb$DEV_ID\"} '"
    check "del" del $DEV_ID
else
    fail "add -t http" "$DEV_JSON"
fi
R1=$(ranges disk.img)
echo "# range requests for the cold run: $R1"

section "add again with the same cache: nothing fetched again"
if add -t http --url $URL --cache $CACHE/disk.cache --bitmap $CACHE/disk.bitmap; then
    eq "cache state reused" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "cmp again" cmp $DEV_B $WWW/disk.img
    check "mount and checksums again" bash -c "mount -t ext4 -o ro $DEV_B /mnt/h && cd /mnt/h && sha256sum -c /tmp/sums && cd / && umount /mnt/h"
    eq "zero new range requests" "$R1" "$(ranges disk.img)"
    del $DEV_ID >/dev/null
else
    fail "add again" "$DEV_JSON"
fi

section "cold sequential read: few, large range requests"
rm -f $CACHE/seq.*
if add -t http --url $URL --cache $CACHE/seq.cache --bitmap $CACHE/seq.bitmap; then
    sleep 1; B=$(ranges disk.img)  # after the kernel's partition scan
    check "read 64 MiB sequentially" dd if=$DEV_B of=/dev/null bs=1M count=64 iflag=direct
    N=$(( $(ranges disk.img) - B ))
    echo "# 64 MiB cold sequential: $N range requests"
    check "at most 64M/4M + 4 = 20 range requests" test $N -le 20
    del $DEV_ID >/dev/null
else
    fail "add for sequential" "$DEV_JSON"
fi

section "concurrent readers of the same pages: one fetch"
rm -f $CACHE/dup.*
if add -t http --url $URL --cache $CACHE/dup.cache --bitmap $CACHE/dup.bitmap --readahead 0; then
    sleep 1; B=$(ranges disk.img)  # after the kernel's partition scan
    for i in 1 2 3 4; do dd if=$DEV_B of=/dev/null bs=64k skip=800 count=1 iflag=direct 2>/dev/null & done
    wait
    eq "four concurrent reads of one 64k block fetch it once" 1 "$(( $(ranges disk.img) - B ))"
    del $DEV_ID >/dev/null
else
    fail "add for dedup" "$DEV_JSON"
fi

section "object size not a multiple of 512"
if add -t http --url http://127.0.0.1:8080/odd.bin --cache $CACHE/odd.cache --bitmap $CACHE/odd.bitmap; then
    eq "size rounded up to 512" 1000448 "$(blockdev --getsize64 $DEV_B)"
    check "the object's bytes, then zeros" bash -c "cmp <(head -c 1000003 $DEV_B) $WWW/odd.bin && cmp <(tail -c 445 $DEV_B) <(head -c 445 /dev/zero)"
    del $DEV_ID >/dev/null
else
    fail "add odd" "$DEV_JSON"
fi

section "kill -9 in the middle of a cold read"
rm -f $CACHE/k.*
if add -t http --url $URL --cache $CACHE/k.cache --bitmap $CACHE/k.bitmap --readahead 256K; then
    dd if=$DEV_B of=/dev/null bs=64k iflag=direct 2>/dev/null &
    DD=$!
    sleep 2
    kill -9 $DEV_PID
    wait_for 30 dead $DD; kill -9 $DD 2>/dev/null; wait $DD 2>/dev/null
    check "del the dead device" del $DEV_ID
    if add -t http --url $URL --cache $CACHE/k.cache --bitmap $CACHE/k.bitmap; then
        check "after kill -9 and add: identical to the object" cmp $DEV_B $WWW/disk.img
        del $DEV_ID >/dev/null
    else
        fail "add after kill -9" "$DEV_JSON"
    fi
else
    fail "add for kill -9" "$DEV_JSON"
fi

section "the object changes on the server"
cp $WWW/disk.img /tmp/old.img
dd if=/dev/urandom of=$WWW/disk.img bs=1M seek=90 count=2 conv=notrunc 2>/dev/null
touch -d '2030-01-01 00:00:00' $WWW/disk.img
if add -t http --url $URL --cache $CACHE/disk.cache --bitmap $CACHE/disk.bitmap; then
    check "cache started afresh, and says so" bash -c "echo '$DEV_JSON' | jq -r .target_options.cache_state | grep -q 'afresh'"
    check "the device shows the new bytes" cmp $DEV_B $WWW/disk.img
    check "not the old ones" bash -c "! cmp -s $DEV_B /tmp/old.img"
    del $DEV_ID >/dev/null
else
    fail "add after change" "$DEV_JSON"
fi

section "eviction: --cache-max-size keeps the cache under the bound, data stays correct"
rm -f $CACHE/ev.*
if add -t http --url $URL --cache $CACHE/ev.cache --bitmap $CACHE/ev.bitmap --cache-max-size 8M; then
    # 32 MiB, 4 times the bound (the whole 96 MiB took a minute under TCG).
    check "cmp of the first 32 MiB against the object" cmp -n $((32 << 20)) $DEV_B $WWW/disk.img
    sleep 2.5  # eviction runs when idle, behind a sync cycle
    KB=$(du -k $CACHE/ev.cache | cut -f1)
    echo "# cache file allocated: $KB KiB"
    # (plus the 4 KiB trailer that binds the cache file to its bitmap)
    check "allocated size under 8 MiB" test "$KB" -le $((8192 + 4))
    check "cmp again after eviction" cmp -n $((32 << 20)) $DEV_B $WWW/disk.img
    sleep 2.5
    check "still under 8 MiB" test "$(du -k $CACHE/ev.cache | cut -f1)" -le $((8192 + 4))
    del $DEV_ID >/dev/null
else
    fail "add --cache-max-size" "$DEV_JSON"
fi

section "bad remotes: refused at add, one line"
expect_error "server without Range" "ignores Range" "$UBLK" add -t http --url http://127.0.0.1:8080/norange/disk.img --cache $CACHE/n.cache --bitmap $CACHE/n.bitmap
expect_error "404" "404" "$UBLK" add -t http --url http://127.0.0.1:8080/missing.img --cache $CACHE/m.cache --bitmap $CACHE/m.bitmap
expect_error "connection refused" "connect" "$UBLK" add -t http --url http://127.0.0.1:8099/disk.img --cache $CACHE/r.cache --bitmap $CACHE/r.bitmap
expect_error "bad url" "bad --url" "$UBLK" add -t http --url ftp://x/y
truncate -s 8M /tmp/other.bitmap.src
expect_error "a bitmap of another image is refused" "bitmap" "$UBLK" add -t http --url http://127.0.0.1:8080/odd.bin --cache $CACHE/disk.cache --bitmap $CACHE/disk.bitmap
eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop

section "URLs that differ in a query value are different images (default cache paths)"
# Two images of the same size and mtime (so nginx gives them the same ETag and
# Last-Modified) behind one path, told apart by ?id=: a second nginx on 8081.
IDW=/srv/id; IDOV=/var/tmp/id-overlays; IDLOG=/var/log/nginx/id-access.log
cmp_device() { dd if="$1" bs=1M iflag=direct 2>/dev/null | cmp - "$2"; }
mkdir -p $IDW $IDOV /var/cache  # the default caches go to /var/cache/ublk-http
head -c $((8 << 20)) /dev/urandom > $IDW/a.img
head -c $((8 << 20)) /dev/urandom > $IDW/b.img
touch -d '2025-01-01 00:00:00' $IDW/a.img $IDW/b.img
cat > /run/nginx/id.conf <<NGINX
user root;
worker_processes 1;
pid /run/nginx/id.pid;
error_log /var/log/nginx/id-error.log warn;
events { worker_connections 64; }
http {
    default_type application/octet-stream;
    access_log $IDLOG;
    map \$arg_id \$image { a /a.img; b /b.img; default ""; }
    server {
        listen 127.0.0.1:8081;
        root $IDW;
        location = /download { try_files \$image =404; }
    }
}
NGINX
rm -f $IDLOG
check "nginx for ?id=" /usr/sbin/nginx -c /run/nginx/id.conf
wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:8081/download?id=a"
check "nginx serves ?id=a and ?id=b apart, with the same ETag" bash -c "
    curl -sf 'http://127.0.0.1:8081/download?id=a' | cmp - $IDW/a.img && curl -sf 'http://127.0.0.1:8081/download?id=b' | cmp - $IDW/b.img &&
    [ \"\$(curl -sfI 'http://127.0.0.1:8081/download?id=a' | grep -i '^etag')\" = \"\$(curl -sfI 'http://127.0.0.1:8081/download?id=b' | grep -i '^etag')\" ]"
IDA="http://127.0.0.1:8081/download?id=a"; IDB="http://127.0.0.1:8081/download?id=b"
rm -f /var/cache/ublk-http/download-*
CA=""; CB=""
if add -t http --url "$IDA"; then
    CA=$(echo "$DEV_JSON" | jq -r .target_options.cache)
    check "?id=a: the device is a.img" cmp_device $DEV_B $IDW/a.img
    del $DEV_ID >/dev/null
else
    fail "add ?id=a" "$DEV_JSON"
fi
if add -t http --url "$IDB"; then
    CB=$(echo "$DEV_JSON" | jq -r .target_options.cache)
    eq "?id=b after ?id=a: a cache of its own, fresh" fresh "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "?id=b after ?id=a: the device is b.img, not a.img's cached bytes" cmp_device $DEV_B $IDW/b.img
    del $DEV_ID >/dev/null
else
    fail "add ?id=b" "$DEV_JSON"
fi
check "default cache files differ for ?id=a and ?id=b" test -n "$CA" -a -n "$CB" -a "$CA" != "$CB"
check "no query value in a cache file name" bash -c "! ls /var/cache/ublk-http | grep -q 'id=\|id_a\|id_b'"
if add -t http --url "$IDA"; then
    A_ID=$DEV_ID; A_B=$DEV_B
    if add -t http --url "$IDB"; then
        check "both at once: ?id=a is a.img" cmp_device $A_B $IDW/a.img
        check "both at once: ?id=b is b.img" cmp_device $DEV_B $IDW/b.img
        del $DEV_ID >/dev/null
    else
        fail "add ?id=b beside ?id=a" "$DEV_JSON"
    fi
    del $A_ID >/dev/null
else
    fail "add ?id=a again" "$DEV_JSON"
fi
eq "status of ?id=a's cache: the URL without its query value, and a digest" 1 \
    "$("$UBLK" status --bitmap "${CA%.cache}.bitmap" | jq -r .url | grep -c '^http://127.0.0.1:8081/download?id=REDACTED#sha256=[0-9a-f]\{32\}$')"

section "URLs that differ in a query value get their own overlay bases"
lower_of() { "$UBLK" list -n "$1" | jq -r '.[0].target_options.lower' | sed 's|/dev/ublkb||'; }
if add -t http --url "$IDA" --overlay-dir $IDOV --overlay ida; then
    OA=$DEV_ID; OA_B=$DEV_B; BA=$(lower_of $OA)
    if add -t http --url "$IDB" --overlay-dir $IDOV --overlay idb; then
        OB=$DEV_ID; BB=$(lower_of $OB)
        check "overlay over ?id=a reads a.img" cmp_device $OA_B $IDW/a.img
        check "overlay over ?id=b reads b.img" cmp_device $DEV_B $IDW/b.img
        check "two bases" test "$BA" != "$BB"
        eq "list shows two read-only http devices" 2 "$("$UBLK" list | jq '[.[] | select(.target == "http" and .read_only)] | length')"
        del $OB >/dev/null
        [ "$BB" = "$BA" ] || del $BB >/dev/null
    else
        fail "add --overlay idb" "$DEV_JSON"
    fi
    del $OA >/dev/null
    del $BA >/dev/null
else
    fail "add --overlay ida" "$DEV_JSON"
fi

section "a URL signed again finds its cache"
S1="$IDA&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=K1&X-Amz-Date=20250101T000000Z&X-Amz-Expires=60&X-Amz-Signature=1111"
S2="$IDA&X-Amz-Date=20250202T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=T2&X-Amz-Signature=2222&X-Amz-Credential=K2"
if add -t http --url "$S1"; then
    eq "signed: the cache of the unsigned URL" "$CA" "$(echo "$DEV_JSON" | jq -r .target_options.cache)"
    eq "signed: reused" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "signed: a.img" cmp_device $DEV_B $IDW/a.img
    del $DEV_ID >/dev/null
else
    fail "add signed" "$DEV_JSON"
fi
R=$(grep -c '" 206 ' $IDLOG || true)
if add -t http --url "$S2"; then
    eq "signed again: the same cache" "$CA" "$(echo "$DEV_JSON" | jq -r .target_options.cache)"
    eq "signed again: reused" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "signed again: a.img" cmp_device $DEV_B $IDW/a.img
    eq "signed again: no range fetched" "$R" "$(grep -c '" 206 ' $IDLOG || true)"
    del $DEV_ID >/dev/null
else
    fail "add signed again" "$DEV_JSON"
fi
eq "nothing left" "[]" "$("$UBLK" list)"
/usr/sbin/nginx -c /run/nginx/id.conf -s stop 2>/dev/null

section "mirrors: --url twice; one killed, one stopped mid-read; one that serves another object"
# Two nginx of their own (one process each, so kill -9 and SIGSTOP take a
# mirror whole) serving the same file: the same size, ETag and Last-Modified.
mirror_up() { # PORT ROOT
    cat > /run/nginx/m$1.conf <<NGINX
user root;
master_process off;
pid /run/nginx/m$1.pid;
error_log /var/log/nginx/m$1-error.log warn;
events { worker_connections 256; }
http {
    default_type application/octet-stream;
    log_format ublk '\$remote_addr "\$request" \$status \$body_bytes_sent "\$http_range"';
    access_log /var/log/nginx/m$1.log ublk;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$1; root $2; }
}
NGINX
    /usr/sbin/nginx -c /run/nginx/m$1.conf && wait_for 10 /usr/bin/curl -s -o /dev/null http://127.0.0.1:$1/
}
mirror_pid() { cat /run/nginx/m$1.pid; }
served_by() { grep -c '" 206 ' /var/log/nginx/m$1.log || true; }
MA=http://127.0.0.1:8082/disk.img; MB=http://127.0.0.1:8083/disk.img
check "mirror A (8082)" mirror_up 8082 $WWW
check "mirror B (8083)" mirror_up 8083 $WWW
# read_timed DEV: reads DEV in 1 MiB O_DIRECT blocks into /tmp/mread.img,
# noting the longest wait for one block (ms) in /tmp/mread.gap.
read_timed() {
    local n=$(( $(blockdev --getsize64 $1) >> 20 )) i t0 t1 gap=0
    : > /tmp/mread.img
    for i in $(seq 0 $((n - 1))); do
        t0=$(date +%s%N)
        dd if=$1 bs=1M skip=$i count=1 iflag=direct status=none >> /tmp/mread.img || return 1
        t1=$(date +%s%N)
        [ $(( (t1 - t0) / 1000000 )) -gt $gap ] && gap=$(( (t1 - t0) / 1000000 ))
    done
    echo $gap > /tmp/mread.gap
}
rm -f $CACHE/m.*
MOPTS="--cache $CACHE/m.cache --bitmap $CACHE/m.bitmap --readahead 0 --connections 2"
if add -t http --url $MA --url $MB $MOPTS; then
    eq "list shows the mirror" "$MB" "$(echo "$DEV_JSON" | jq -r .target_options.mirrors)"
    read_timed $DEV_B & R=$!
    wait_for 30 bash -c "[ \$(stat -c %s /tmp/mread.img) -ge $((24 << 20)) ]"
    kill -9 $(mirror_pid 8082)
    echo "# mirror A killed at $(( $(stat -c %s /tmp/mread.img) >> 20 )) MiB"
    wait $R; eq "the read goes on and ends (A killed)" 0 $?
    check "what it read is the image" cmp /tmp/mread.img $WWW/disk.img
    echo "# longest wait for a block: $(cat /tmp/mread.gap) ms"
    sleep 1.5
    S=$("$UBLK" list -n $DEV_ID)
    check "stats count the failover, no error" bash -c "echo '$S' | jq -e '.[0].stats.failovers >= 1 and .[0].stats.errors == 0'"
    check "B served the rest" test "$(served_by 8083)" -gt 0
    check "the server logged A going down" grep -q "mirror http://127.0.0.1:8082/disk.img is down" /run/ublk-http/ublk$DEV_ID.log
    del $DEV_ID >/dev/null
else
    fail "add with two mirrors" "$DEV_JSON"
fi
# Stopped (SIGSTOP): connections open, nothing answered. The reads move on
# within --mirror-stall (0.5 s), not after curl's 20 s low-speed limit.
check "mirror A again" mirror_up 8082 $WWW
rm -f $CACHE/m.*
if add -t http --url $MA --url $MB $MOPTS; then
    read_timed $DEV_B & R=$!
    wait_for 30 bash -c "[ \$(stat -c %s /tmp/mread.img) -ge $((24 << 20)) ]"
    kill -STOP $(mirror_pid 8082)
    wait $R; eq "the read goes on and ends (A stopped)" 0 $?
    check "what it read is the image" cmp /tmp/mread.img $WWW/disk.img
    G=$(cat /tmp/mread.gap)
    echo "# longest wait for a block: $G ms"
    check "no block waited 3 s (the stall is left within 0.5 s; emulation is slow)" test "$G" -lt 3000
    kill -CONT $(mirror_pid 8082)
    del $DEV_ID >/dev/null
else
    fail "add with two mirrors (stall)" "$DEV_JSON"
fi
# A mirror down at add: the device comes up from the other.
kill -9 $(mirror_pid 8082)
rm -f $CACHE/m.*
if add -t http --url $MA --url $MB $MOPTS; then
    check "A down at add: the device reads the image from B" cmp $DEV_B $WWW/disk.img
    del $DEV_ID >/dev/null
else
    fail "add with the first mirror down" "$DEV_JSON"
fi
mkdir -p /srv/other && head -c $((96 << 20)) /dev/urandom > /srv/other/disk.img
check "mirror C (8084): another object at the same path" mirror_up 8084 /srv/other
rm -f $CACHE/m.*
expect_error "mirrors that disagree are refused" "serves another object than http://127.0.0.1:8083/disk.img" \
    "$UBLK" add -t http --url $MB --url http://127.0.0.1:8084/disk.img $MOPTS
expect_error "an s3:// mirror is refused" "are http:// or https:// URLs" "$UBLK" add -t http --url $MB --url s3://b/k $MOPTS
expect_error "a URL given twice is refused" "given twice" "$UBLK" add -t http --url $MB --url $MB $MOPTS
expect_error "--mirror-stall 0 is refused" "mirror-stall must be between" "$UBLK" add -t http --url $MB --mirror-stall 0 $MOPTS
eq "nothing left" "[]" "$("$UBLK" list)"
for p in 8083 8084; do kill -9 $(mirror_pid $p); done

finish
