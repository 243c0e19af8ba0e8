# On the real driver: many writable devices from one image.
# `add -t http --url URL --overlay NAME` attaches an overlay device over the
# image's shared base (one read-only http device per URL, started by the
# first add): four devices mount one ext4 image, each writes its own files;
# nginx serves each page once; the base's cache holds one copy; overlays
# are reattached by name; kill -9 of one server leaves the others serving.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/shared; OV=/var/tmp/overlays
mkdir -p $WWW $C $OV
LOG=/var/log/nginx/access.log
# Bytes of the image nginx served so far (the access log's body bytes).
served() { awk '$5 == "/disk.img" { s += $8 } END { print s + 0 }' $LOG; }
base_of() { "$UBLK" list -n "$1" | jq -r '.[0].target_options.lower' | sed 's|/dev/ublkb||'; }

# On 6.x this suite runs what goes through the kernel's data path (user copy
# there): one and four devices over a base, kill -9, a killed overlay server
# recovered, two queues. The rest (reattach, hydrate, dirty/sync, bad input,
# --cache-max-size, --recovery waits, profiles, a base waiting for recover,
# --foreground) is the same code on every kernel and runs on 7.x.
ALL=1; [[ $(uname -r) == 6.* ]] && ALL=
[[ $ALL ]] || echo "# kernel $(uname -r): the data path sections only (the others run on 7.x)"

section "an ext4 image with a set of files, served by nginx"
src=$(mktemp -d)
mkdir -p $src/d
for i in 1 2 3 4; do head -c $(( i * 700000 + 4096 * i + 11 )) /dev/urandom > $src/d/f$i; done
seq 1 50000 > $src/numbers.txt
(cd $src && sha256sum d/* numbers.txt) > /tmp/sums
truncate -s 64M $WWW/disk.img
check "mkfs.ext4 -d" mkfs.ext4 -q -F -d $src $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
# Readahead 1M in both runs: what four interleaved readers read ahead differs
# from one reader's, and that is not what is measured here (sharing is).
OPTS="--url $URL --cache $C/base.cache --bitmap $C/base.bitmap --overlay-dir $OV --readahead 1M"

# use N: mount device N's overlay at /mnt/sN, read the image's files, write
# its own file (kept in /tmp/own-N), sync, read it back.
use() {
    local n=$1 dev=$2
    mkdir -p /mnt/s$n
    mount -t ext4 $dev /mnt/s$n || return 1
    (cd /mnt/s$n && sha256sum -c --quiet /tmp/sums) || return 1
    head -c $((600000 + n * 4096)) /dev/urandom > /tmp/own-$n
    cp /tmp/own-$n /mnt/s$n/own-$n && sync -f /mnt/s$n/own-$n || return 1
    cmp /tmp/own-$n /mnt/s$n/own-$n
}

section "one device alone: what it needs from nginx"
if add -t http $OPTS --overlay solo; then
    SOLO=$DEV_ID; BASE=$(base_of $DEV_ID)
    eq "the device is writable" 0 "$(blockdev --getro $DEV_B)"
    eq "the overlay was created" created "$(echo "$DEV_JSON" | jq -r .target_options.overlay_state)"
    eq "its base is a read-only http device" "http true" "$("$UBLK" list -n $BASE | jq -r '.[0] | "\(.target) \(.read_only)"')"
    check "mount, read the image's files, write its own" use 0 $DEV_B
    check "umount" umount /mnt/s0
    ONE=$(served)
    echo "# one device alone: nginx served $ONE bytes"
    expect_error "del of a base under an overlay is refused" "is the base of ublk$SOLO" "$UBLK" del -n $BASE
    check "del the device" del $SOLO
    check "del its base" del $BASE
else
    fail "add -t http --overlay" "$DEV_JSON"; ONE=0
fi

section "four devices from one URL over a fresh base"
rm -f $C/base.*
: > $LOG
IDS=()
for n in 1 2 3 4; do
    if add -t http $OPTS --overlay vm$n; then IDS+=($DEV_ID); else fail "add vm$n" "$DEV_JSON"; fi
done
eq "four devices" 4 "${#IDS[@]}"
BASE=$(base_of ${IDS[0]})
eq "one base under all four" "$BASE $BASE $BASE $BASE" "$(for i in "${IDS[@]}"; do base_of $i; done | xargs)"
eq "one http device in all" 1 "$("$UBLK" list | jq '[.[] | select(.target == "http")] | length')"
# All four at once: the base's one planner merges what they miss together.
for n in 1 2 3 4; do use $n /dev/ublkb${IDS[$((n - 1))]} > /tmp/use-$n.log 2>&1 & done
wait
for n in 1 2 3 4; do check "device $n: mounts, reads the image's files, writes and reads its own" bash -c "cat /tmp/use-$n.log; [ ! -s /tmp/use-$n.log ]"; done
for n in 1 2 3 4; do
    eq "device $n sees its own file only" "own-$n" "$(cd /mnt/s$n && ls own-* | xargs)"
done
FOUR=$(served)
echo "# four devices: nginx served $FOUR bytes (one alone: $ONE)"
# Once, not once per device: a base per device would serve 2x or more. Four
# readers interleaved on the base's queue trigger its readahead differently
# from one reader (measured 0.96x to 1.14x over seven runs), so the bound is
# 1.5x; that no page is fetched twice is the exact check just below.
check "nginx served at most 1.5x what one device needed" test $((FOUR * 10)) -le $((ONE * 15))
sleep 1.5  # statistics are published once a second
check "the base fetched each page once (bytes fetched = pages present)" bash -c "$UBLK list -n $BASE | jq -e '.[0].stats | .bytes_fetched <= .pages_present * .page_size'"
BASEKB=$(du -k $C/base.cache | cut -f1)
echo "# base cache: $BASEKB KiB on disk; overlays: $(du -k $OV/vm*.overlay | cut -f1 | xargs) KiB"
check "the base cache file holds one copy (du <= 1.1x the bytes served)" test $((BASEKB * 1024 * 10)) -le $((FOUR * 11 + 1048576 * 10))
for n in 1 2 3 4; do
    OVKB=$(du -k $OV/vm$n.overlay | cut -f1)
    check "overlay $n holds its writes, not the image ($OVKB KiB)" test $OVKB -lt $((BASEKB / 2))
done

if [[ $ALL ]]; then  # (the same on every kernel: on 7.x only)
section "del and add again: the overlay is kept"
check "umount device 1" umount /mnt/s1
check "del device 1" del ${IDS[0]}
if add -t http $OPTS --overlay vm1; then
    IDS[0]=$DEV_ID
    eq "reattached" reattached "$(echo "$DEV_JSON" | jq -r .target_options.overlay_state)"
    eq "over the same base" "$BASE" "$(base_of $DEV_ID)"
    check "its file is there" bash -c "mount -t ext4 $DEV_B /mnt/s1 && cmp /tmp/own-1 /mnt/s1/own-1"
else
    fail "add vm1 again" "$DEV_JSON"
fi
expect_error "an overlay in use is refused" "overlay 'vm2' is in use by another device" "$UBLK" add -t http $OPTS --overlay vm2

section "hydrate through an overlay device fills the base; then nginx can go"
check "hydrate -n device 4 (its base)" bash -c "timeout 300 $UBLK hydrate -n ${IDS[3]} | tail -n 1 | jq -e '.percent == 100'"
eq "the base is whole" "$("$UBLK" list -n $BASE | jq '.[0].stats.pages_total')" "$("$UBLK" list -n $BASE | jq '.[0].stats.pages_present')"
nginx-stop
N0=$(wc -l < $LOG)
echo 3 > /proc/sys/vm/drop_caches
check "device 4 reads every file with nginx stopped" bash -c "cd /mnt/s4 && sha256sum -c --quiet /tmp/sums && cmp /tmp/own-4 own-4"
eq "nothing requested" "$N0" "$(wc -l < $LOG)"
check "nginx again" nginx-start $WWW 8080
fi  # ALL

section "kill -9 of one server leaves the others serving"
P2=$("$UBLK" list -n ${IDS[1]} | jq -r '.[0].pid')
kill -9 $P2; wait_for 10 dead $P2
timeout 30 umount /mnt/s2 2>/dev/null || timeout 30 umount -l /mnt/s2
del ${IDS[1]} >/dev/null 2>&1
echo 3 > /proc/sys/vm/drop_caches
for n in 1 3 4; do
    check "device $n still reads the image's files and its own" bash -c "cd /mnt/s$n && sha256sum -c --quiet /tmp/sums && cmp /tmp/own-$n own-$n"
    check "device $n still writes" bash -c "head -c 300000 /dev/urandom > /tmp/more-$n && cp /tmp/more-$n /mnt/s$n/more && sync -f /mnt/s$n/more && cmp /tmp/more-$n /mnt/s$n/more"
done
check "the base is whole: cmp of it with the image" cmp /dev/ublkb$BASE $WWW/disk.img
if add -t http $OPTS --overlay vm2; then
    IDS[1]=$DEV_ID
    check "the killed device's overlay comes back with its synced file" bash -c "mount -t ext4 $DEV_B /mnt/s2 && cmp /tmp/own-2 /mnt/s2/own-2"
else
    fail "add vm2 again" "$DEV_JSON"
fi

if [[ $ALL ]]; then  # (the same on every kernel: on 7.x only)
section "dirty and sync on an overlay device: an exact replica"
check "umount device 3" umount /mnt/s3
check "dirty lists what device 3 wrote" bash -c "$UBLK dirty -n ${IDS[2]} | jq -e '.pages > 0'"
cp $WWW/disk.img /var/tmp/replica3.img
check "sync --to a copy of the image" "$UBLK" sync -n ${IDS[2]} --to /var/tmp/replica3.img
check "the replica equals device 3" cmp /dev/ublkb${IDS[2]} /var/tmp/replica3.img
eq "nothing dirty after sync" 0 "$("$UBLK" dirty -n ${IDS[2]} | jq .pages)"
rm -f /var/tmp/replica3.img

section "bad input"
expect_error "overlay without a name" "needs --overlay NAME" "$UBLK" add -t overlay --lower /dev/ublkb$BASE
expect_error "an invalid overlay name" "invalid overlay name" "$UBLK" add -t http $OPTS --overlay ../x
head -c 8M /dev/urandom > $WWW/other.img
expect_error "an overlay of another image" "overlay 'solo' was written over another image" "$UBLK" add -t http --url http://127.0.0.1:8080/other.img --cache $C/other.cache --bitmap $C/other.bitmap --overlay-dir $OV --overlay solo
eq "the failed add left no base behind" 1 "$("$UBLK" list | jq '[.[] | select(.target == "http")] | length')"
expect_error "--overlay on a loop device" "applies to the http and overlay targets only" "$UBLK" add -t loop -f $WWW/other.img --overlay x
fi  # ALL

section "cleanup"
for n in 1 2 3 4; do umount /mnt/s$n 2>/dev/null; done
for i in "${IDS[@]}"; do del $i >/dev/null 2>&1; done
check "del the base when no overlay is left" del $BASE

if [[ $ALL ]]; then  # (the same on every kernel: on 7.x only)
section "one --cache-max-size for the base, whichever device read a page"
rm -f $C/m.*
MOPTS="--url $URL --cache $C/m.cache --bitmap $C/m.bitmap --overlay-dir $OV --readahead 1M --cache-max-size 4M"
if add -t http $MOPTS --overlay m1; then
    M1=$DEV_ID; M1B=$DEV_B; MB=$(base_of $DEV_ID)
    if add -t http $MOPTS --overlay m2; then
        M2=$DEV_ID
        for d in $M1B $DEV_B; do (mkdir -p /mnt/m$(basename $d) && mount -t ext4 -o ro,noload $d /mnt/m$(basename $d) && cd /mnt/m$(basename $d) && sha256sum -c --quiet /tmp/sums; r=$?; cd /; umount /mnt/m$(basename $d); exit $r) > /tmp/m-$(basename $d).log 2>&1 & done
        wait
        check "two devices read every file through a base bounded far below the files" bash -c "cat /tmp/m-*.log; ! grep -q . /tmp/m-*.log"
        sleep 2  # eviction runs behind the fetches
        PRESENT=$("$UBLK" list -n $MB | jq '.[0].stats.pages_present * .[0].stats.page_size')
        echo "# base holds $PRESENT bytes under a 4 MiB bound; nginx served $(served) bytes in all so far"
        check "the base holds at most its bound" test "$PRESENT" -le $((4 << 20))
        del $M2 >/dev/null
    else
        fail "add m2" "$DEV_JSON"
    fi
    del $M1 >/dev/null; del $MB >/dev/null
else
    fail "add m1 with --cache-max-size" "$DEV_JSON"
fi

section "the base's server killed: devices added with --recovery wait for recover"
rm -f $C/r.*
ROPTS="--url $URL --cache $C/r.cache --bitmap $C/r.bitmap --overlay-dir $OV --recovery"
if add -t http $ROPTS --overlay r1; then
    R1=$DEV_ID; R1B=$DEV_B; RB=$(base_of $DEV_ID)
    RBP=$("$UBLK" list -n $RB | jq -r '.[0].pid')
    kill -9 $RBP; wait_for 10 dead $RBP
    dd if=$R1B of=/tmp/r1.out bs=1M count=4 skip=8 iflag=direct 2>/dev/null &
    DD=$!
    sleep 2
    check "a read through the dead base waits, not fails" alive $DD
    check "recover the base" "$UBLK" recover -n $RB
    wait $DD; eq "the held read completes" 0 $?
    check "with the image's bytes" bash -c "cmp /tmp/r1.out <(dd if=$WWW/disk.img bs=1M count=4 skip=8 2>/dev/null)"
    del $R1 >/dev/null; del $RB >/dev/null
else
    fail "add r1 --recovery" "$DEV_JSON"
fi
fi  # ALL

section "an overlay server killed is not a power loss: unflushed writes read back after recover"
rm -f $C/k.*
KOPTS="--url $URL --cache $C/k.cache --bitmap $C/k.bitmap --overlay-dir $OV"
if add -t http $KOPTS --overlay k1 --recovery; then
    K1=$DEV_ID; K1B=$DEV_B; KB=$(base_of $DEV_ID)
    head -c $((2 << 20)) /dev/urandom > /tmp/k-whole
    head -c 1536 /dev/urandom > /tmp/k-part
    # Whole pages, and three sectors inside a page (a copy-up): O_DIRECT, no FLUSH.
    check "write 2 MiB of whole pages, no FLUSH" dd if=/tmp/k-whole of=$K1B bs=4k seek=2048 oflag=direct
    check "write 3 sectors inside a page, no FLUSH" dd if=/tmp/k-part of=$K1B bs=512 seek=$((3000 * 8 + 3)) count=3 oflag=direct
    check "a FUA write completes (the page after), bounded" timeout 60 dd if=/tmp/k-part of=$K1B bs=512 seek=$((3001 * 8)) count=3 oflag=direct,dsync
    expect_part() { cmp <(dd if=$K1B bs=512 skip=$((3000 * 8)) count=8 iflag=direct 2>/dev/null) \
        <(dd if=$WWW/disk.img bs=512 skip=$((3000 * 8)) count=3 2>/dev/null; cat /tmp/k-part; dd if=$WWW/disk.img bs=512 skip=$((3000 * 8 + 6)) count=2 2>/dev/null); }
    kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
    r=$(timeout 60 "$UBLK" recover -n $K1 2>&1)
    if [ $? -eq 0 ]; then ok "recover the overlay device"; else fail "recover the overlay device" "$r"; fi
    echo 3 > /proc/sys/vm/drop_caches
    check "every acknowledged whole-page write reads back" bash -c "cmp <(dd if=$K1B bs=4k skip=2048 count=512 iflag=direct 2>/dev/null) /tmp/k-whole"
    check "the partial write reads back over the image's bytes" expect_part
    check "dirty lists every page written before the kill" bash -c "$UBLK dirty -n $K1 | jq -e '.pages >= 513'"
    check "a FLUSH succeeds" blockdev --flushbufs $K1B
    check "and the writes are still there" bash -c "cmp <(dd if=$K1B bs=4k skip=2048 count=512 iflag=direct 2>/dev/null) /tmp/k-whole"

    # After a sync, pages rewritten and the server killed: listed dirty, so a sync gives an exact replica.
    cp $WWW/disk.img /var/tmp/k-replica.img
    check "sync --to a replica" "$UBLK" sync -n $K1 --to /var/tmp/k-replica.img
    eq "nothing dirty after sync" 0 "$("$UBLK" dirty -n $K1 | jq .pages)"
    head -c $((256 << 10)) /dev/urandom > /tmp/k-again
    check "rewrite 64 pages after the sync, no FLUSH" dd if=/tmp/k-again of=$K1B bs=4k seek=2100 oflag=direct
    P=$("$UBLK" list -n $K1 | jq -r '.[0].pid')
    kill -9 $P; wait_for 10 dead $P
    r=$(timeout 60 "$UBLK" recover -n $K1 2>&1)
    if [ $? -eq 0 ]; then ok "recover again"; else fail "recover again" "$r"; fi
    check "dirty after the crash lists the rewritten pages" bash -c "$UBLK dirty -n $K1 | jq -e '.pages >= 64'"
    check "sync after the crash" "$UBLK" sync -n $K1 --to /var/tmp/k-replica.img
    check "the replica equals the device" cmp $K1B /var/tmp/k-replica.img

    # The plain way back: kill -9, del, add again (no recover).
    head -c $((128 << 10)) /dev/urandom > /tmp/k-third
    check "write 32 more pages, no FLUSH" dd if=/tmp/k-third of=$K1B bs=4k seek=4000 oflag=direct
    P=$("$UBLK" list -n $K1 | jq -r '.[0].pid')
    kill -9 $P; wait_for 10 dead $P
    del $K1 >/dev/null 2>&1
    if add -t http $KOPTS --overlay k1; then
        K1=$DEV_ID; K1B=$DEV_B
        check "after del and add: the unflushed writes read back" bash -c "cmp <(dd if=$K1B bs=4k skip=4000 count=32 iflag=direct 2>/dev/null) /tmp/k-third"
        check "and the earlier ones" bash -c "cmp <(dd if=$K1B bs=4k skip=2048 count=52 iflag=direct 2>/dev/null) <(head -c $((52 * 4096)) /tmp/k-whole)"
        check "and the replica still matches up to the new pages" bash -c "cmp <(dd if=$K1B bs=4k count=4000 iflag=direct 2>/dev/null) <(head -c $((4000 * 4096)) /var/tmp/k-replica.img)"
    else
        fail "add k1 again" "$DEV_JSON"
    fi

    section "an overlay's files are bound together: a lost or replaced data file is refused"
    del $K1 >/dev/null 2>&1
    KD=$OV/k1.overlay
    cp --sparse=always $KD /var/tmp/k-backup.overlay
    # A new generation on the next add: the copy becomes an older backup.
    if add -t http $KOPTS --overlay k1; then del $DEV_ID >/dev/null; else fail "add k1 for a new generation" "$DEV_JSON"; fi
    cp --sparse=always $KD /var/tmp/k-good.overlay
    damaged() { # NAME DAMAGE...: the add is one line, and nothing was changed
        "${@:2}"
        expect_error "$1: refused in one line" "locally written pages" "$UBLK" add -t http $KOPTS --overlay k1
        cp --sparse=always /var/tmp/k-good.overlay $KD
    }
    damaged "the data file deleted" rm -f $KD
    damaged "the data file truncated" truncate -s 1M $KD
    damaged "the data file replaced by another of its size" bash -c "rm -f $KD; truncate -s $(stat -c %s /var/tmp/k-good.overlay) $KD"
    damaged "the data file restored from an older backup" cp --sparse=always /var/tmp/k-backup.overlay $KD
    if add -t http $KOPTS --overlay k1; then
        check "with the files together again every write reads back" bash -c "cmp <(dd if=$DEV_B bs=4k skip=4000 count=32 iflag=direct 2>/dev/null) /tmp/k-third"
        del $DEV_ID >/dev/null
    else
        fail "add k1 with its files together" "$DEV_JSON"
    fi
    del $KB >/dev/null 2>&1
    rm -f /var/tmp/k-*.overlay /var/tmp/k-replica.img
else
    fail "add k1 --recovery" "$DEV_JSON"
fi

section "an overlay device with two queues: fio --verify, DISCARD and WRITE_ZEROES"
rm -f $C/q.*
if add -t http --url $URL --cache $C/q.cache --bitmap $C/q.bitmap --overlay-dir $OV --overlay q1 -q 2; then
    Q1=$DEV_ID; Q1B=$DEV_B; QB=$(base_of $DEV_ID)
    eq "two queues" 2 "$("$UBLK" list -n $Q1 | jq '.[0].queues')"
    eq "no hydrated_percent for an overlay device (its base hydrates)" null "$("$UBLK" list -n $Q1 | jq '.[0].hydrated_percent')"
    eq "discard is offered" 1 "$(cat /sys/block/ublkb$Q1/queue/discard_granularity | awk '{print ($1 > 0)}')"
    check "fio --verify, two jobs on two CPUs (both queues)" fio --name=q --filename=$Q1B --ioengine=io_uring --direct=1 \
        --rw=randrw --bs=4k --iodepth=8 --numjobs=2 --offset_increment=16M --size=8M --verify=crc32c --verify_fatal=1 \
        --cpus_allowed=0,1 --cpus_allowed_policy=split --output=/tmp/fio-q.txt
    check "reads past the writes are still the image's" bash -c "cmp <(dd if=$Q1B bs=1M skip=40 count=8 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=1M skip=40 count=8 2>/dev/null)"
    check "discard 64K inside the image" blkdiscard -o $((48 << 20)) -l 65536 $Q1B
    check "the discarded range reads as zeros" bash -c "cmp <(dd if=$Q1B bs=64k skip=768 count=1 iflag=direct 2>/dev/null) <(head -c 65536 /dev/zero)"
    check "write zeroes over 3 sectors inside a page" blkdiscard -z -o $(((50 << 20) + 1024)) -l 1536 $Q1B
    check "the zeroed sectors read as zeros, the rest of the page as the image" bash -c "cmp <(dd if=$Q1B bs=512 skip=$(((50 << 20) / 512)) count=8 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=512 skip=$(((50 << 20) / 512)) count=2 2>/dev/null; head -c 1536 /dev/zero; dd if=$WWW/disk.img bs=512 skip=$(((50 << 20) / 512 + 5)) count=3 2>/dev/null)"
    del $Q1 >/dev/null
    if add -t http --url $URL --cache $C/q.cache --bitmap $C/q.bitmap --overlay-dir $OV --overlay q1; then
        check "after del and add the zeros are kept" bash -c "cmp <(dd if=$DEV_B bs=64k skip=768 count=1 iflag=direct 2>/dev/null) <(head -c 65536 /dev/zero)"
        del $DEV_ID >/dev/null
    else
        fail "add q1 again" "$DEV_JSON"
    fi
    del $QB >/dev/null 2>&1
else
    fail "add q1 -q 2" "$DEV_JSON"
fi

if [[ $ALL ]]; then  # (the same on every kernel: on 7.x only)
section "boot profiles through overlay devices: recorded and replayed by the base"
# No readahead, so that a read the replay did not cover is a miss.
POPTS="--url $URL --cache $C/p.cache --bitmap $C/p.bitmap --overlay-dir $OV --readahead 0"
bstats() { "$UBLK" list -n $1 | jq -r ".[0].stats.$2"; }
reads() { mount -t ext4 -o ro,noload $1 /mnt/p && (cd /mnt/p && cat d/* numbers.txt > /dev/null) && umount /mnt/p; }
mkdir -p /mnt/p
rm -f $C/p.*
if add -t http $POPTS --overlay p1; then
    P1=$DEV_ID; PB=$(base_of $DEV_ID)
    "$UBLK" profile record -n $P1 --out /tmp/ov.profile >/tmp/ovrec.out 2>/tmp/ovrec.err &
    REC=$!
    check "profile record on an overlay device starts (on its base)" wait_for 30 grep -q recording /tmp/ovrec.err
    check "mount and read the files" reads $DEV_B
    check "profile stop" "$UBLK" profile stop -n $P1
    wait $REC
    check "the profile holds the pages read" jq -e '.pages > 100' /tmp/ov.profile
    del $P1 >/dev/null; del $PB >/dev/null
fi
rm -f $C/p.*
if add -t http $POPTS --overlay p2 --prefetch-profile /tmp/ov.profile; then
    P2=$DEV_ID; PB=$(base_of $DEV_ID)
    check "the replay on the fresh base ends done" "$UBLK" profile status -n $P2 --wait
    sleep 1.5
    H0=$(bstats $PB hits); M0=$(bstats $PB misses)
    check "the same reads again" reads $DEV_B
    sleep 1.5
    H=$(( $(bstats $PB hits) - H0 )); M=$(( $(bstats $PB misses) - M0 ))
    echo "# after the replay: $H hits, $M misses"
    check "at least 90% of the reads are hits" test $((H * 10)) -ge $(((H + M) * 9))
    if add -t http $POPTS --overlay p3 --prefetch-profile /tmp/ov.profile; then
        check "a later device's profile is replayed on the running base" "$UBLK" profile status -n $DEV_ID --wait
        del $DEV_ID >/dev/null
    else
        fail "add p3 with a profile over the running base" "$DEV_JSON"
    fi
    jq -c '.etag = "\"other\""' /tmp/ov.profile > /tmp/other.profile
    expect_error "a profile of another image is refused in one line" "does not fit" "$UBLK" add -t http $POPTS --overlay p4 --prefetch-profile /tmp/other.profile
    del $P2 >/dev/null; del $PB >/dev/null
else
    fail "add p2 with a profile" "$DEV_JSON"
fi
nginx-stop

section "a base waiting for recover is not absent: add --overlay recovers it, never starts a second"
check "nginx again" nginx-start $WWW 8080
rm -f $C/w.*
WOPTS="--url $URL --cache $C/w.cache --bitmap $C/w.bitmap --overlay-dir $OV --recovery"
# The processes that hold FILE open.
holders() { for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null | grep -q -- " -> $1\$" && echo ${p#/proc/}; done | xargs; }
# kill9 PID: kill -9 of a server and wait for it to die (nothing for a pid that is not one).
kill9() { [ "${1:-0}" -gt 0 ] 2>/dev/null && kill -9 $1 && wait_for 10 dead $1; }
bases_of_w() { "$UBLK" list | jq "[.[] | select(.target == \"http\" and .target_options.cache == \"$C/w.cache\")] | length"; }
# region DEV MIB: 2 MiB of DEV (O_DIRECT) from MIB on equal the image's, read
# within 60 s (a read may wait in a device that no server serves).
region() { timeout 60 bash -c "cmp <(dd if=$1 bs=1M skip=$2 count=2 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=1M skip=$2 count=2 2>/dev/null)"; }
if add -t http $WOPTS --overlay w1; then
    W1=$DEV_ID; W1B=$DEV_B; WB=$(base_of $DEV_ID)
    WBP=$("$UBLK" list -n $WB | jq -r '.[0].pid')
    kill9 $WBP
    dd if=$W1B of=/tmp/w1.out bs=1M count=4 skip=20 iflag=direct 2>/dev/null &
    DD=$!
    sleep 1
    check "a read through the dead base waits" alive $DD
    T0=$(date +%s)
    W2JSON=$(timeout 60 "$UBLK" add -t http $WOPTS --overlay w2 2>/tmp/w2.err); rc=$?
    echo "# add --overlay over the waiting base: exit $rc in $(( $(date +%s) - T0 )) s: $W2JSON $(cat /tmp/w2.err)"
    eq "add --overlay of the same image succeeds and returns (within 60 s)" 0 $rc
    W2=$(echo "$W2JSON" | jq -r .dev_id 2>/dev/null)
    eq "one base of the image in list" 1 "$(bases_of_w)"
    eq "the new device is over the same base" "$WB" "$(base_of $W2 2>/dev/null)"
    WBP2=$("$UBLK" list -n $WB | jq -r '.[0].pid')
    check "the base was recovered: a new server runs it" bash -c "[ '$WBP2' -gt 0 ] && [ '$WBP2' != '$WBP' ] && kill -0 $WBP2"
    eq "the base is LIVE" LIVE "$("$UBLK" list -n $WB | jq -r '.[0].state')"
    eq "one process holds the base's cache file" "$WBP2" "$(holders $C/w.cache)"
    if wait_for 60 dead $DD; then
        wait $DD; eq "the read held in the base completes with exit 0" 0 $?
        check "with the image's bytes" bash -c "cmp /tmp/w1.out <(dd if=$WWW/disk.img bs=1M count=4 skip=20 2>/dev/null)"
    else
        fail "the read held in the base completes" "still waiting after 60 s"
    fi
    check "reads through the new device complete" region /dev/ublkb$W2 30
    kill9 $WBP2
    check "recover of the base works after that (nothing else holds its cache)" timeout 60 "$UBLK" recover -n $WB
    check "reads through the first device complete" region $W1B 40
    check "and through the second" region /dev/ublkb$W2 50

    del $W2 >/dev/null; del $W1 >/dev/null
    check "del the base when no overlay is left" del $WB
else
    fail "add w1 --recovery" "$DEV_JSON"
fi
# Whatever a failure above left on these cache files goes.
for d in $("$UBLK" list | jq -r ".[] | select(.target_options.cache == \"$C/w.cache\") | .dev_id"); do del $d >/dev/null 2>&1; done

section "del of a base sees an overlay device waiting for recover"
rm -f $C/w.*
if add -t http $WOPTS --overlay w3; then
    W3=$DEV_ID; W3B=$DEV_B; WB=$(base_of $DEV_ID)
    kill9 $DEV_PID
    expect_error "del of its base is refused while it waits for recover" \
        "ublk$WB is the base of ublk$W3 \(its server died; it waits for .ublk-http recover -n $W3.\): del that overlay device first" "$UBLK" del -n $WB
    eq "the base still runs" LIVE "$("$UBLK" list -n $WB | jq -r '.[0].state')"
    check "recover the overlay device" timeout 60 "$UBLK" recover -n $W3
    check "it reads through its base" region $W3B 12
    kill9 "$("$UBLK" list -n $W3 | jq -r '.[0].pid')"
    check "del the dead overlay device" del $W3
    check "its block device is gone" wait_for 10 gone $W3B
    check "then del of the base" del $WB
else
    fail "add w3 --recovery" "$DEV_JSON"
fi

section "add --foreground --overlay: the base in the background, the overlay device served in the foreground"
rm -f $C/f.*
FOPTS="--url $URL --cache $C/f.cache --bitmap $C/f.bitmap --overlay-dir $OV"
# --writable too: an overlay device is writable, the base never is.
"$UBLK" add --foreground -t http $FOPTS --overlay fg --writable > /tmp/fg.out 2>/tmp/fg.err &
FG=$!
if wait_for 60 grep -q '^{' /tmp/fg.out; then
    FGID=$(jq -r .dev_id /tmp/fg.out); FGB=/dev/ublkb$FGID
    eq "list: an overlay device" overlay "$("$UBLK" list -n $FGID | jq -r '.[0].target')"
    FB=$(base_of $FGID)
    eq "over a read-only http base of the image" "http true false $URL" \
        "$("$UBLK" list -n $FB | jq -r '.[0] | "\(.target) \(.read_only) \(.target_options.writable) \(.target_options.url)"')"
    eq "the overlay device is served by the foreground process" "$FG" "$("$UBLK" list -n $FGID | jq -r '.[0].pid')"
    check "the base by another, in the background" bash -c "[ \"\$($UBLK list -n $FB | jq -r '.[0].pid')\" != $FG ]"
    check "the overlay is the named one" test -f $OV/fg.overlay
    head -c 1M /dev/urandom > /tmp/fg.data
    check "write to the device" dd if=/tmp/fg.data of=$FGB bs=1M seek=3 oflag=direct conv=fsync
    check "read it back" bash -c "cmp <(dd if=$FGB bs=1M skip=3 count=1 iflag=direct 2>/dev/null) /tmp/fg.data"
    check "the base still reads the image there" bash -c "cmp <(dd if=/dev/ublkb$FB bs=1M skip=3 count=1 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=1M skip=3 count=1 2>/dev/null)"
    kill -TERM $FG
    check "SIGTERM ends the foreground process" wait_for 30 dead $FG
    wait $FG; eq "which exits 0" 0 $?
    check "the overlay device goes" wait_for 10 gone $FGB
    eq "list no longer has it" 0 "$("$UBLK" list | jq "[.[] | select(.dev_id == $FGID)] | length")"
    eq "the base stays" LIVE "$("$UBLK" list -n $FB | jq -r '.[0].state')"
    del $FB >/dev/null
else
    fail "add --foreground --overlay" "$(cat /tmp/fg.out /tmp/fg.err)"
    kill $FG 2>/dev/null
fi
expect_error "a foreground overlay add that fails is one line" "overlay 'solo' was written over another image" \
    "$UBLK" add --foreground -t http --url http://127.0.0.1:8080/other.img --cache $C/other.cache --bitmap $C/other.bitmap --overlay-dir $OV --overlay solo
eq "and leaves no base behind" 0 "$("$UBLK" list | jq '[.[] | select(.target == "http")] | length')"
fi  # ALL
nginx-stop
finish
