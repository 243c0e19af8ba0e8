# On the real driver: boot profiles against nginx. Record the
# pages a mount and a set of file reads touch first; replay them on a fresh
# cache (offline with `prefetch --profile`, and in the background with `add
# --prefetch-profile`), then repeat the same reads: at least 90% hits, and
# the replay in far fewer range requests than pages.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; CACHE=/var/tmp/ublk-cache
mkdir -p $WWW $CACHE /mnt/p
LOG=/var/log/nginx/access.log
# Range GETs of the image logged so far (nginx logs 206 for each).
ranges() { grep -c "GET /$1 HTTP/1.1\" 206" $LOG || true; }
# The boot-like read set: mount, read every file of the set, unmount.
reads() { mount -t ext4 -o ro "$1" /mnt/p && (cd /mnt/p && sha256sum -c /tmp/sums >/dev/null) && umount /mnt/p; }
# The same from the CPUs of hardware queue 1 (not always vCPU 1: blk-mq maps
# them as it likes), whose requests the server's queue 1 serves, hits by itself.
reads_on_queue1() { taskset -cp "$(cat /sys/block/${1#/dev/}/mq/1/cpu_list)" $BASHPID >/dev/null && reads "$1"; }
stat_of() { "$UBLK" stats -n "$1" --json | jq -r ".$2"; }

section "an ext4 image: a set of small files among a large filler nobody reads"
src=$(mktemp -d)
mkdir -p $src/etc $src/lib $src/bin
for i in $(seq 1 24); do head -c $(( (i * 7919) % 60000 + 3000 )) /dev/urandom > $src/etc/conf$i; done
for i in $(seq 1 8); do head -c $(( i * 90000 + 1234 )) /dev/urandom > $src/lib/lib$i.so; done
head -c $((40 << 20)) /dev/urandom > $src/bin/filler
(cd $src && sha256sum etc/* lib/*) > /tmp/sums
truncate -s 96M $WWW/disk.img
check "mkfs.ext4 -d" mkfs.ext4 -q -F -d $src $WWW/disk.img
rm -rf $src
# The same bytes under other validators (nginx's ETag is mtime and size): another image to a profile.
cp $WWW/disk.img $WWW/other.img
touch -d '2031-01-01 00:00:00' $WWW/other.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
PROFILE=/tmp/boot.profile
echo '{"format":"ublk-http-profile","version":1}' > /tmp/bad.profile

section "record: mount and read the set while profile record runs"
rm -f $CACHE/rec.*
if add -t http --url $URL --cache $CACHE/rec.cache --bitmap $CACHE/rec.bitmap; then
    sleep 1  # the kernel's partition scan: before the recording
    "$UBLK" profile record -n $DEV_ID --out $PROFILE >/tmp/rec.out 2>/tmp/rec.err &
    REC=$!
    check "profile record starts" wait_for 30 grep -q recording /tmp/rec.err
    expect_error "a second recording is refused" "already recording" "$UBLK" profile record -n $DEV_ID --out /tmp/second.profile
    check "mount and read the set" reads $DEV_B
    check "profile stop" "$UBLK" profile stop -n $DEV_ID
    wait $REC; eq "profile record exits 0" 0 $?
    cat /tmp/rec.out
    check "the profile is written, version 1, for this image" jq -e '.format == "ublk-http-profile" and .version == 1 and .image_size == 100663296 and .page_size == 4096 and (.etag | length > 0)' $PROFILE
    eq "the profile is 0644" 644 "$(stat -c %a $PROFILE)"
    check "no temporary left beside it" bash -c "! ls /tmp/boot.profile.tmp.* 2>/dev/null"
    P=$(jq .pages $PROFILE)
    RUNS=$(jq '.runs | length' $PROFILE)
    echo "# profile: $P pages in $RUNS runs"
    # The set is ~1.2 MiB of file data plus ext4's metadata; the 40 MiB filler was never read.
    check "the profile holds the set, not the 10240 pages of filler" test "$P" -ge 300 -a "$P" -le 6000
    check "runs are disjoint and within the image" bash -c "jq -e '[.runs[] | range(.[0]; .[0] + .[1])] | (length == (unique | length)) and (max < 24576)' $PROFILE"
    check "record's summary names the pages" bash -c "jq -e '.pages == $P and .ended == \"stopped\"' /tmp/rec.out"
    expect_error "profile stop once the recording was taken" "not recording" "$UBLK" profile stop -n $DEV_ID
    expect_error "profile record --out in a missing directory" "cannot write" "$UBLK" profile record -n $DEV_ID --out /nonexistent/dir/p
    # Bounds: --max-pages ends the recording by itself, and the file is written
    # (a new recording starts afresh: pages read before count again).
    "$UBLK" profile record -n $DEV_ID --out /tmp/small.profile --max-pages 5 >/tmp/small.out 2>/tmp/small.err &
    SMALL=$!
    check "profile record --max-pages 5 starts" wait_for 30 grep -q recording /tmp/small.err
    dd if=$DEV_B of=/dev/null bs=4k count=64 skip=2000 iflag=direct 2>/dev/null
    wait $SMALL; eq "record with --max-pages 5 ends by itself" 0 $?
    eq "and holds 5 pages" 5 "$(jq .pages /tmp/small.profile 2>/dev/null)"
    eq "ended by the page bound" pages "$(jq -r .ended /tmp/small.out 2>/dev/null)"
    "$UBLK" profile record -n $DEV_ID --out /tmp/timed.profile --seconds 1 >/tmp/timed.out 2>/dev/null
    # Ctrl-C ends the recording and still writes the profile.
    "$UBLK" profile record -n $DEV_ID --out /tmp/int.profile >/tmp/int.out 2>/tmp/int.err &
    INT=$!
    check "profile record (for Ctrl-C) starts" wait_for 30 grep -q recording /tmp/int.err
    dd if=$DEV_B of=/dev/null bs=4k count=3 skip=3000 iflag=direct 2>/dev/null
    kill -INT $INT
    wait $INT; eq "record ended by SIGINT exits 0" 0 $?
    eq "and wrote what it had" 3 "$(jq .pages /tmp/int.profile 2>/dev/null)"
    expect_error "no recording runs after it" "not recording" "$UBLK" profile stop -n $DEV_ID
    eq "record with --seconds 1 ends by itself" seconds "$(jq -r .ended /tmp/timed.out 2>/dev/null)"
    del $DEV_ID >/dev/null
else
    fail "add for recording" "$DEV_JSON"
    P=1
fi

section "a warm cache, -q 2: the same reads as a baseline, recorded again"
# Hits on queue 1 are served there; while a profile records they are told to the home.
if add -t http --url $URL --cache $CACHE/rec.cache --bitmap $CACHE/rec.bitmap -q 2; then
    sleep 1.5
    "$UBLK" profile record -n $DEV_ID --out /tmp/warm.profile >/tmp/warm.out 2>/tmp/warm.err &
    REC=$!
    check "profile record on -q 2 starts" wait_for 30 grep -q recording /tmp/warm.err
    H0=$(stat_of $DEV_ID hits); M0=$(stat_of $DEV_ID misses)
    T0=$(date +%s.%N)
    for q in /sys/block/ublkb$DEV_ID/mq/*; do echo "# hw queue $(basename $q): cpus $(cat $q/cpu_list)"; done
    check "reads on the warm cache, from hardware queue 1's CPUs" reads_on_queue1 $DEV_B
    T1=$(date +%s.%N)
    "$UBLK" profile stop -n $DEV_ID >/dev/null
    wait $REC
    sleep 1.5
    echo "# warm: $(awk "BEGIN { print $T1 - $T0 }") s, hits $(( $(stat_of $DEV_ID hits) - H0 )), misses $(( $(stat_of $DEV_ID misses) - M0 ))"
    P2=$(jq .pages /tmp/warm.profile 2>/dev/null || echo 0)
    echo "# the warm -q 2 recording: $P2 pages (the cold one: $P)"
    check "queue 1's hits are recorded: the same pages within 5%" test $(( P2 * 100 )) -ge $(( P * 95 )) -a $(( P2 * 100 )) -le $(( P * 105 ))
    del $DEV_ID >/dev/null
fi

# replay_hits NAME: after a replay into the device's cache, repeats the reads
# and checks that at least 90% of them are hits. The devices measured run with
# --readahead 0: a hit then comes from the replay, not from a readahead window
# (with it, this small image's cold reads hit 90% by themselves).
replay_hits() {
    sleep 1.5  # stats are published once a second
    local h0 m0 h m
    h0=$(stat_of $DEV_ID hits); m0=$(stat_of $DEV_ID misses)
    check "$1: the same reads" reads $DEV_B
    sleep 1.5
    h=$(( $(stat_of $DEV_ID hits) - h0 )); m=$(( $(stat_of $DEV_ID misses) - m0 ))
    echo "# $1: $h hits, $m misses"
    check "$1: at least 90% of the reads are hits" test $(( h * 100 )) -ge $(( (h + m) * 90 )) -a $h -gt 0
}

section "prefetch --profile: a fresh cache filled offline"
rm -f $CACHE/off.*
B=$(ranges disk.img)
check "prefetch --profile" "$UBLK" prefetch --url $URL --cache $CACHE/off.cache --bitmap $CACHE/off.bitmap --profile $PROFILE
N=$(( $(ranges disk.img) - B ))
PRESENT=$("$UBLK" status --bitmap $CACHE/off.bitmap | jq .pages_present)
echo "# prefetch --profile: $N range requests for $P profile pages ($PRESENT pages present)"
check "every profile page is present" test "$PRESENT" -ge "$P"
check "coalesced: at most one range request per 16 profile pages" test $(( N * 16 )) -le "$P"
check "far fewer pages than the image's" test "$PRESENT" -le $(( P * 4 ))
if add -t http --url $URL --cache $CACHE/off.cache --bitmap $CACHE/off.bitmap --readahead 0; then
    replay_hits "after prefetch --profile"
    del $DEV_ID >/dev/null
else
    fail "add after prefetch --profile" "$DEV_JSON"
fi

section "cold, without a profile: the same reads, for comparison"
rm -f $CACHE/cold.*
if add -t http --url $URL --cache $CACHE/cold.cache --bitmap $CACHE/cold.bitmap --readahead 0; then
    sleep 1.5
    B=$(ranges disk.img)
    H0=$(stat_of $DEV_ID hits); M0=$(stat_of $DEV_ID misses)
    T0=$(date +%s.%N)
    check "cold reads" reads $DEV_B
    T1=$(date +%s.%N)
    sleep 1.5
    H=$(( $(stat_of $DEV_ID hits) - H0 )); M=$(( $(stat_of $DEV_ID misses) - M0 ))
    echo "# cold: $(awk "BEGIN { print $T1 - $T0 }") s, $(( $(ranges disk.img) - B )) range requests, hits $H, misses $M"
    # The control for the 90% checks: without a replay, few reads hit.
    check "cold, no readahead, no profile: under half the reads hit" test $(( H * 2 )) -lt $(( H + M ))
    del $DEV_ID >/dev/null
fi

section "add --prefetch-profile: a fresh cache, the replay in the background, then the same reads"
rm -f $CACHE/on.*
B=$(ranges disk.img)
T0=$(date +%s.%N)
if add -t http --url $URL --cache $CACHE/on.cache --bitmap $CACHE/on.bitmap --readahead 0 --prefetch-profile $PROFILE; then
    check "profile status --wait: the replay is done" "$UBLK" profile status -n $DEV_ID --wait
    T1=$(date +%s.%N)
    FS=$("$UBLK" profile status -n $DEV_ID)
    echo "# replay: $FS"
    N=$(( $(ranges disk.img) - B ))
    RQ=$(echo "$FS" | jq .requests)
    echo "# replay: $RQ range requests for $P profile pages ($N range requests since add, the partition scan's included), $(awk "BEGIN { print $T1 - $T0 }") s from add to done"
    eq "the replay is a profile fill" profile "$(echo "$FS" | jq -r .kind)"
    check "every page of the replay is present" bash -c "echo '$FS' | jq -e '.fill_pages_present == .fill_pages and .fill_pages >= $P'"
    check "coalesced: at most one range request per 16 profile pages" test $(( RQ * 16 )) -le "$P" -a "$RQ" -gt 0
    check "nginx agrees: at most one range request per 16 profile pages, the partition scan's aside" test $(( (N - 4) * 16 )) -le "$P"
    T0=$(date +%s.%N)
    replay_hits "after add --prefetch-profile"
    del $DEV_ID >/dev/null
else
    fail "add --prefetch-profile" "$DEV_JSON"
fi

section "bad input: one line each"
expect_error "add --prefetch-profile: a profile of another image" "another image" "$UBLK" add -t http --url http://127.0.0.1:8080/other.img --cache $CACHE/y.cache --bitmap $CACHE/y.bitmap --prefetch-profile $PROFILE
expect_error "add --prefetch-profile: a malformed profile" "not a ublk-http profile" "$UBLK" add -t http --url $URL --cache $CACHE/y.cache --bitmap $CACHE/y.bitmap --prefetch-profile /tmp/bad.profile
expect_error "add --prefetch-profile: a missing profile" "cannot read the profile" "$UBLK" add -t http --url $URL --prefetch-profile /tmp/none.profile
expect_error "add --prefetch-profile on a null device" "http target only" "$UBLK" add -t null --size 1G --prefetch-profile $PROFILE
expect_error "prefetch: a profile of another image" "another image" "$UBLK" prefetch --url http://127.0.0.1:8080/other.img --cache $CACHE/x.cache --bitmap $CACHE/x.bitmap --profile $PROFILE
expect_error "prefetch: a malformed profile" "not a ublk-http profile" "$UBLK" prefetch --url $URL --cache $CACHE/x.cache --bitmap $CACHE/x.bitmap --profile /tmp/bad.profile
check "a refused profile leaves no cache behind" test ! -e $CACHE/x.cache -a ! -e $CACHE/x.bitmap
expect_error "prefetch: a missing profile" "cannot read the profile" "$UBLK" prefetch --url $URL --cache $CACHE/x.cache --bitmap $CACHE/x.bitmap --profile /tmp/none.profile
expect_error "prefetch: --range and --profile" "not both" "$UBLK" prefetch --url $URL --range 0-1M --profile $PROFILE
if add -t null --size 1G; then
    expect_error "profile record on a null device" "http devices" "$UBLK" profile record -n $DEV_ID --out /tmp/null.profile
    check "no file left for the refused recording" test ! -e /tmp/null.profile
    del $DEV_ID >/dev/null
fi
expect_error "profile stop on no device" "no running server|no such device" "$UBLK" profile stop -n 999
expect_error "profile record --max-pages 0" "max-pages" "$UBLK" profile record -n 0 --out /tmp/p --max-pages 0

eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop

section "a profile of more than 64 KiB of runs replays on a running base (add --overlay)"
check "nginx (again)" nginx-start $WWW 8080
# 6000 single pages 8 MiB apart in a sparse 64 GiB image: no window merges
# them, so the request to the running base carries 6000 ranges (~80 KB).
truncate -s 64G $WWW/wide.img
WOPTS="--url http://127.0.0.1:8080/wide.img --cache $CACHE/wide.cache --bitmap $CACHE/wide.bitmap --overlay-dir $CACHE/ov --readahead 0"
rm -rf $CACHE/wide.* $CACHE/ov; mkdir -p $CACHE/ov
if add -t http $WOPTS --overlay w1; then
    W1=$DEV_ID
    WB=$("$UBLK" list -n $W1 | jq -r '.[0].target_options.lower' | sed 's|/dev/ublkb||')
    # For the image as the base sees it (its size and validators).
    "$UBLK" list -n $WB | jq -c '.[0].target_options | {format: "ublk-http-profile", version: 1, url,
        image_size: (.image_size | tonumber), etag, last_modified, page_size: 4096, pages: 6000,
        runs: [range(6000) | [. * 2048 + 2048, 1]]}' > /tmp/wide.profile
    echo "# the wide profile: $(stat -c %s /tmp/wide.profile) bytes"
    B=$(ranges wide.img)
    if add -t http $WOPTS --overlay w2 --prefetch-profile /tmp/wide.profile; then
        ok "add --overlay with a profile of 6000 runs over the running base"
        check "the replay on the running base ends done" timeout 300 "$UBLK" profile status -n $WB --wait
        FS=$("$UBLK" profile status -n $WB)
        echo "# wide replay: $(echo "$FS" | jq -c '{state, fill_pages, fill_pages_present, requests}')"
        eq "every page of the profile is present" "6000 6000" "$(echo "$FS" | jq -r '"\(.fill_pages) \(.fill_pages_present)"')"
        check "nginx served the replay: a range request per page" test $(( $(ranges wide.img) - B )) -ge 6000
        del $DEV_ID >/dev/null
    else
        fail "add --overlay with a profile of 6000 runs over the running base" "$DEV_JSON"
    fi
    del $W1 >/dev/null; del $WB >/dev/null
else
    fail "add --overlay w1 (the base)" "$DEV_JSON"
fi
rm -rf $CACHE/wide.* $CACHE/ov $WWW/wide.img

section "a profile with overflowing numbers: one line at add, prefetch and an overlay's add over a running base"
# Written as text: the numbers are past what jq computes exactly.
head='{"format":"ublk-http-profile","version":1,"url":"u","etag":null,"last_modified":null,'
echo "$head"'"image_size":18446744073709551615,"page_size":4096,"pages":1,"runs":[[0,1]]}' > /tmp/over_size.profile
echo "$head"'"image_size":100663296,"page_size":4096,"pages":1,"runs":[[18446744073709551615,18446744073709551615]]}' > /tmp/over_run.profile
# The largest image in 512-byte pages (2^54): 1025 runs of all of it add up past 2^64.
whole=$(printf '[0,18014398509481984],%.0s' $(seq 1025) | sed 's/,$//')
echo "$head"'"image_size":9223372036854775807,"page_size":512,"pages":0,"runs":['"$whole"']}' > /tmp/over_sum.profile
echo "$head"'"image_size":100663296,"page_size":-4096,"pages":1,"runs":[[0,1]]}' > /tmp/neg.profile
for f in over_size over_run over_sum neg; do
    case $f in
        over_size) want="bad image_size 18446744073709551615" ;;
        over_run) want="run 0 is not \[first page, page count\]" ;;
        over_sum) want="overlap" ;;
        neg) want="bad page_size -4096" ;;
    esac
    expect_error "add --prefetch-profile: $f" "$want" "$UBLK" add -t http --url $URL --cache $CACHE/y.cache --bitmap $CACHE/y.bitmap --prefetch-profile /tmp/$f.profile
    expect_error "prefetch --profile: $f" "$want" "$UBLK" prefetch --url $URL --cache $CACHE/x.cache --bitmap $CACHE/x.bitmap --profile /tmp/$f.profile
done
OOPTS="--url $URL --cache $CACHE/o.cache --bitmap $CACHE/o.bitmap --overlay-dir $CACHE/ov"
rm -rf $CACHE/o.* $CACHE/ov; mkdir -p $CACHE/ov
if add -t http $OOPTS --overlay o1; then
    O1=$DEV_ID
    OB=$("$UBLK" list -n $O1 | jq -r '.[0].target_options.lower' | sed 's|/dev/ublkb||')
    expect_error "an overlay's add over a running base: a run at 2^64-1" "run 0 is not" "$UBLK" add -t http $OOPTS --overlay o2 --prefetch-profile /tmp/over_run.profile
    expect_error "an overlay's add over a running base: counts past 2^64" "overlap" "$UBLK" add -t http $OOPTS --overlay o2 --prefetch-profile /tmp/over_sum.profile
    check "the base serves on" alive "$("$UBLK" list -n $OB | jq -r '.[0].pid')"
    del $O1 >/dev/null; del $OB >/dev/null
else
    fail "add --overlay o1" "$DEV_JSON"
fi
rm -rf $CACHE/o.* $CACHE/ov
eq "nothing left after the overflowing profiles" "[]" "$("$UBLK" list)"
nginx-stop

finish
