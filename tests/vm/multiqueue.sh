# On the real driver: -q 4 for the http and cache targets.
# Queue 0 is the home (fetches, page states, persistence); the others serve
# hits themselves and hand misses, writes and FLUSH to it. fio jobs are
# pinned one per vCPU (blk-mq maps each CPU to one queue), so requests
# arrive on four queues at once and cross between them. The driver gives a
# device at most one queue per CPU: tests/vm.sh boots this suite with 4.
# vm-smp: 4
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/mq
mkdir -p $WWW $C
head -c $((32 << 20)) /dev/urandom > $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
LOG=/var/log/nginx/access.log
ranges() { grep -c "GET /$1 HTTP/1.1\" 206" $LOG || true; }
stat_of() { "$UBLK" stats -n $DEV_ID --json | jq -r ".$1"; }
# 4 jobs, each on its own 8 MiB (overlapping writes of two jobs have no
# defined result), random sizes 512 B-256 KiB, reads and writes, verified.
FIO4="fio --ioengine=io_uring --direct=1 --iodepth=16 --randrepeat=1 --randseed=7 --numjobs=4 \
    --cpus_allowed=0-$(( $(nproc) - 1 )) --cpus_allowed_policy=split --size=8M --offset_increment=8M \
    --bsrange=512-256k --blockalign=512 --rw=randrw --verify=crc32c --do_verify=1 --verify_fatal=1"

# cold4 DEV FILE BYTES: 4 readers, two per vCPU, read the first BYTES of DEV at once; each compares with FILE.
cold4() {
    local pids=() rc=0 i
    for i in 0 1 2 3; do
        taskset -c $((i % $(nproc))) cmp -n $3 $1 $2 >/tmp/cold-$i.txt 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait $i || rc=1; done
    return $rc
}

section "http -q 4: 4 readers of one cold region fetch each page once"
if add -t http --url $URL --cache $C/h.cache --bitmap $C/h.bitmap -q 4; then
    # The driver caps the queues at the CPU count: this suite's VM has 4 (vm-smp above).
    eq "4 vCPUs" 4 "$(nproc)"
    eq "4 queues" 4 "$(echo "$DEV_JSON" | jq -r .queues)"
    echo "# data path: $(echo "$DEV_JSON" | jq -r .data_path)"
    sleep 1; B=$(ranges disk.img)  # after the kernel's partition scan
    check "4 concurrent readers of the first 16 MiB read the image's bytes" cold4 $DEV_B $WWW/disk.img $((16 << 20))
    sleep 1.2
    F=$(stat_of bytes_fetched); P=$(stat_of pages_present)
    echo "# bytes fetched $F, pages present $P, range requests $(( $(ranges disk.img) - B ))"
    eq "every page fetched once: bytes fetched = pages present × 4096" $((P * 4096)) "$F"
    check "the whole image, 4 readers at once" cold4 $DEV_B $WWW/disk.img $((32 << 20))
    sleep 1.2
    eq "still every page once" $(( $(stat_of pages_present) * 4096 )) "$(stat_of bytes_fetched)"
    H=$(stat_of hits)
    check "warm: 4 readers again" cold4 $DEV_B $WWW/disk.img $((32 << 20))
    sleep 1.2
    check "warm reads are hits (counted on every queue)" test "$(stat_of hits)" -gt "$H"
    eq "warm: nothing fetched" $(( $(stat_of pages_present) * 4096 )) "$(stat_of bytes_fetched)"
    check "del" del $DEV_ID
else
    fail "add -t http -q 4" "$DEV_JSON"
fi

section "http --writable -q 4: fio --verify, 4 jobs"
if add -t http --url $URL --cache $C/w.cache --bitmap $C/w.bitmap --writable -q 4; then
    check "fio randrw 512 B-256 KiB, 4 jobs, verify" $FIO4 --name=w --filename=$DEV_B --output=/tmp/fio-w.txt
    grep -q 'err= 0' /tmp/fio-w.txt || tail -n 20 /tmp/fio-w.txt
    check "del" del $DEV_ID
    if add -t http --url $URL --cache $C/w.cache --bitmap $C/w.bitmap --writable -q 4; then
        check "after del and add, the writes verify" $FIO4 --name=w --filename=$DEV_B --verify_only=1 --output=/tmp/fio-w2.txt
        del $DEV_ID >/dev/null
    else
        fail "add --writable again" "$DEV_JSON"
    fi
else
    fail "add -t http --writable -q 4" "$DEV_JSON"
fi

for mode in through back; do
    section "cache $mode -q 4: fio --verify, 4 jobs; the backing store equals the device"
    cp $WWW/disk.img /var/tmp/back-$mode.img
    if add -t cache --backing /var/tmp/back-$mode.img --cache $C/$mode.cache --bitmap $C/$mode.bitmap --write-mode $mode -q 4; then
        # The counters of writes and persistence cycles (the bench's measure of the write-ahead cost).
        W0=$(stat_of writes); I0=$(stat_of intent_cycles)
        check "64 O_DIRECT 4k writes from the 4 vCPUs" bash -c "for c in 0 1 2 3; do
            taskset -c \$c dd if=/dev/urandom of=$DEV_B bs=4k count=16 seek=\$((2048 + c * 64)) oflag=direct 2>/dev/null & done; wait"
        sleep 1.2
        eq "stats: 64 more writes" $((W0 + 64)) "$(stat_of writes)"
        check "stats: intent cycles went before them" test "$(stat_of intent_cycles)" -gt "$I0"
        check "cache $mode: fio randrw 512 B-256 KiB, 4 jobs, verify" $FIO4 --name=$mode --filename=$DEV_B --output=/tmp/fio-$mode.txt
        grep -q 'err= 0' /tmp/fio-$mode.txt || tail -n 20 /tmp/fio-$mode.txt
        check "cache $mode: a FLUSH" dd if=/dev/urandom of=$DEV_B bs=4k count=1 seek=7 oflag=direct conv=fsync
        [ $mode = back ] && check "cache back: flush (write-back drained)" timeout 300 "$UBLK" flush -n $DEV_ID
        check "cache $mode: the backing store equals the device" cmp $DEV_B /var/tmp/back-$mode.img
        check "cache $mode: del" del $DEV_ID
    else
        fail "add -t cache --write-mode $mode -q 4" "$DEV_JSON"
    fi
done

section "cache back -q 4 --no-dirty-tracking: writes of absent pages go before their bits"
# Without dirty tracking a write of pages the cache does not hold issues its
# data at once (write-ahead deferred): no intent cycle; the next full cycle
# writes its bits before its present bits.
cp $WWW/disk.img /var/tmp/back-nd.img
if add -t cache --backing /var/tmp/back-nd.img --cache $C/nd.cache --bitmap $C/nd.bitmap --write-mode back --no-dirty-tracking -q 4; then
    I0=$(stat_of intent_cycles)
    check "64 O_DIRECT 4k writes of absent pages from the 4 vCPUs" bash -c "for c in 0 1 2 3; do
        taskset -c \$c dd if=/dev/urandom of=$DEV_B bs=4k count=16 seek=\$((2048 + c * 64)) oflag=direct 2>/dev/null & done; wait"
    sleep 1.2
    eq "stats: no intent cycle" "$I0" "$(stat_of intent_cycles)"
    check "stats: 64 writes went first" test "$(stat_of writes_deferred)" -ge 64
    check "fio randrw verify" $FIO4 --name=nd --filename=$DEV_B --output=/tmp/fio-nd.txt
    grep -q 'err= 0' /tmp/fio-nd.txt || tail -n 20 /tmp/fio-nd.txt
    check "a FLUSH" dd if=/dev/urandom of=$DEV_B bs=4k count=1 seek=7 oflag=direct conv=fsync
    check "flush (write-back drained)" timeout 300 "$UBLK" flush -n $DEV_ID
    check "the backing store equals the device" cmp $DEV_B /var/tmp/back-nd.img
    check "del" del $DEV_ID
else
    fail "add -t cache --no-dirty-tracking -q 4" "$DEV_JSON"
fi

section "cache back -q 4 with eviction: hits on one queue race punches from the other"
cp $WWW/disk.img /var/tmp/back-evict.img
if add -t cache --backing /var/tmp/back-evict.img --cache $C/e.cache --bitmap $C/e.bitmap --write-mode back \
    --cache-max-size 8M --admit all -q 4; then
    check "4 readers of the whole device, far above the bound, read the backing's bytes" cold4 $DEV_B $WWW/disk.img $((32 << 20))
    check "fio randrw verify under eviction" $FIO4 --name=e --filename=$DEV_B --output=/tmp/fio-e.txt
    grep -q 'err= 0' /tmp/fio-e.txt || tail -n 20 /tmp/fio-e.txt
    check "del" del $DEV_ID
else
    fail "add -t cache --cache-max-size -q 4" "$DEV_JSON"
fi

section "kill -9 of a -q 4 server under fio --verify, recover"
truncate -s 64M /var/tmp/crash.img
if add -t cache --backing /var/tmp/crash.img --cache $C/k.cache --bitmap $C/k.bitmap --write-mode back -q 4 --recovery; then
    fio --ioengine=io_uring --direct=1 --iodepth=16 --randrepeat=1 --randseed=11 --numjobs=4 --cpus_allowed=0-$(( $(nproc) - 1 )) \
        --cpus_allowed_policy=split --size=16M --offset_increment=16M --bs=4k --rw=randwrite --verify=crc32c \
        --do_verify=1 --verify_fatal=1 --name=k --filename=$DEV_B --group_reporting --output=/tmp/fio-k.txt >/dev/null 2>&1 &
    FIO_PID=$! OLD=$DEV_PID
    sleep 2
    alive $FIO_PID || fail "fio still writing at the kill" "$(tail -n 5 /tmp/fio-k.txt)"
    kill -9 $OLD
    check "the server died" wait_for 5 dead $OLD
    R=$(timeout 60 "$UBLK" recover -n $DEV_ID 2>&1)
    if [ $? -eq 0 ]; then ok "recover"; else fail "recover" "$R"; fi
    check "fio completes" wait_for 300 dead $FIO_PID
    wait $FIO_PID; eq "fio verified every block it wrote (exit 0)" 0 "$?"
    grep -q 'err= 0' /tmp/fio-k.txt || tail -n 20 /tmp/fio-k.txt
    check "del" del $DEV_ID
    if add -t cache --backing /var/tmp/crash.img --cache $C/k.cache --bitmap $C/k.bitmap --write-mode back -q 4; then
        check "after del and add, fio verifies again" fio --ioengine=io_uring --direct=1 --iodepth=16 --randrepeat=1 \
            --randseed=11 --numjobs=4 --size=16M --offset_increment=16M --bs=4k --rw=randwrite --verify=crc32c \
            --verify_only=1 --verify_fatal=1 --name=k --filename=$DEV_B --output=/tmp/fio-k2.txt
        del $DEV_ID >/dev/null
    else
        fail "add again after the kill" "$DEV_JSON"
    fi
else
    fail "add -q 4 --recovery" "$DEV_JSON"
fi

section "kill -9 of a -q 4 http --writable server, del, add again: unflushed writes read back"
if add -t http --url $URL --cache $C/p.cache --bitmap $C/p.bitmap --writable -q 4; then
    head -c $((4 << 20)) /dev/urandom > /tmp/pattern
    check "2 writers, one per vCPU, 4 MiB of O_DIRECT 4k writes, no FLUSH" bash -c "
        taskset -c 0 dd if=/tmp/pattern of=$DEV_B bs=4k seek=259 count=512 oflag=direct 2>/dev/null & a=\$!
        taskset -c 1 dd if=/tmp/pattern of=$DEV_B bs=4k skip=512 seek=771 count=512 oflag=direct 2>/dev/null & b=\$!
        wait \$a && wait \$b"
    kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
    del $DEV_ID >/dev/null 2>&1
    if add -t http --url $URL --cache $C/p.cache --bitmap $C/p.bitmap --writable -q 4; then
        check "every acknowledged write reads back" bash -c \
            "cmp <(dd if=$DEV_B bs=4k skip=259 count=1024 iflag=direct 2>/dev/null) /tmp/pattern"
        del $DEV_ID >/dev/null
    else
        fail "add again" "$DEV_JSON"
    fi
else
    fail "add -t http --writable -q 4" "$DEV_JSON"
fi

section "bad inputs"
expect_error "queues × depth is bounded for caching targets" "at most 65534 requests" \
    "$UBLK" add -t cache --backing /var/tmp/crash.img --cache $C/x --bitmap $C/y -q 64 -d 4096
nginx-stop
eq "nothing left" "[]" "$("$UBLK" list)"
finish
